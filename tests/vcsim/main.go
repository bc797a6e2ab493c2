// snapferry's vCenter simulator for tests: govmomi's simulator package (Debian
// golang-github-vmware-govmomi-dev) serving the VPX inventory on a loopback port.
// Prints one JSON line (url, sha1/sha256 certificate thumbprints) and runs until
// stdin closes or SIGTERM. Build: GO111MODULE=off GOPATH=/usr/share/gocode go build
package main

import (
	"crypto/sha1"
	"crypto/sha256"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	useTLS := flag.Bool("tls", false, "serve https with the built-in localhost certificate")
	noTools := flag.String("no-tools", "", "name of a VM whose VMware Tools are not running")
	noCBT := flag.String("no-cbt", "", "name of a VM that does not support CBT")
	user := flag.String("user", "user", "login user")
	password := flag.String("password", "pass", "login password")
	flag.Parse()

	m := simulator.VPX()
	if err := m.Create(); err != nil {
		panic(err)
	}
	defer m.Remove()
	// The stock simulator reports Tools as not installed; a real guest has them running.
	// Its VMs lack CBT support and their disk backings carry no CBT changeId: give
	// them both (one changeId "<uuid>/<seq>" per disk, fixed).
	for i, e := range simulator.Map.All("VirtualMachine") {
		vm := e.(*simulator.VirtualMachine)
		vm.Capability.ChangeTrackingSupported = types.NewBool(vm.Name != *noCBT)
		if vm.Name != *noTools {
			vm.Guest.ToolsStatus = types.VirtualMachineToolsStatusToolsOk
			vm.Guest.ToolsRunningStatus = string(types.VirtualMachineToolsRunningStatusGuestToolsRunning)
		}
		for _, dev := range vm.Config.Hardware.Device {
			if disk, ok := dev.(*types.VirtualDisk); ok {
				if b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
					b.ChangeId = fmt.Sprintf("52 5f 00 00 00 00 %02x %02x-00 00 00 00 00 00 00 01/7", i, disk.Key%256)
				}
			}
		}
	}
	m.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, *password)}
	if *useTLS {
		m.Service.TLS = new(tls.Config)
	}
	s := m.Service.NewServer()
	defer s.Close()

	out := map[string]string{"url": s.URL.String()}
	if *useTLS {
		der := s.Certificate().Raw
		out["sha1"] = fmt.Sprintf("%x", sha1.Sum(der))
		out["sha256"] = fmt.Sprintf("%x", sha256.Sum256(der))
	}
	line, _ := json.Marshal(out)
	fmt.Println(string(line))

	done := make(chan struct{})
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); close(done) }()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-done:
	case <-sig:
	}
}
