"""C declarations of the libvixDiskLib (VMware VDDK) API that snapferry uses.

Struct layouts follow vixDiskLib.h of VDDK 7/8 (x86-64, LP64), the same layouts that
nbdkit's vddk plugin declares in ``plugins/vddk/vddk-structs.h``. cffi ABI mode lays
the structs out with the platform's C rules, so field order and types must match the
header exactly; ``tests/test_vddk_binding.py`` checks the sizes and offsets.

The log callbacks of ``VixDiskLib_InitEx`` take ``(const char *fmt, va_list ap)``.
cffi cannot build a Python callback for a ``va_list`` argument safely (and VDDK calls
them from its own threads), so they are declared here as plain ``void *``: same ABI for
a function pointer, and we pass either NULL or the address of a C function from libc
(``vwarnx``) whose signature is exactly ``void (const char *, va_list)``.
"""

from __future__ import annotations

# Functions every supported VDDK (>= 6.5) exports.
REQUIRED_FUNCTIONS = (
    "VixDiskLib_InitEx",
    "VixDiskLib_Exit",
    "VixDiskLib_GetErrorText",
    "VixDiskLib_FreeErrorText",
    "VixDiskLib_ConnectEx",
    "VixDiskLib_Disconnect",
    "VixDiskLib_Open",
    "VixDiskLib_Close",
    "VixDiskLib_GetInfo",
    "VixDiskLib_FreeInfo",
    "VixDiskLib_Read",
    "VixDiskLib_GetTransportMode",
)

# Added in VDDK 6.7: absent from older libraries.
OPTIONAL_FUNCTIONS = (
    "VixDiskLib_QueryAllocatedBlocks",
    "VixDiskLib_FreeBlockList",
)

CDEF = """
typedef uint64_t VixError;
typedef void *VixDiskLibConnection;
typedef void *VixDiskLibHandle;

enum VixDiskLibCredType {
  VIXDISKLIB_CRED_UID       = 1,
  VIXDISKLIB_CRED_SESSIONID = 2,
  VIXDISKLIB_CRED_TICKETID  = 3,
  VIXDISKLIB_CRED_SSPI      = 4,
  VIXDISKLIB_CRED_UNKNOWN   = 256
};

enum VixDiskLibSpecType {
  VIXDISKLIB_SPEC_VMX             = 0,
  VIXDISKLIB_SPEC_VSTORAGE_OBJECT = 1,
  VIXDISKLIB_SPEC_UNKNOWN         = 2
};

struct VixDiskLibVStorageObjectSpec {
  char *id;
  char *datastoreMoRef;
  char *ssId;
};

struct VixDiskLibUidCreds {
  char *userName;
  char *password;
};

struct VixDiskLibSessionIdCreds {
  char *cookie;
  char *userName;
  char *key;
};

union VixDiskLibCreds {
  struct VixDiskLibUidCreds uid;
  struct VixDiskLibSessionIdCreds sessionId;
  void *reserved2;
};

union VixDiskLibSpec {
  struct VixDiskLibVStorageObjectSpec vStorageObjSpec;
};

typedef struct VixDiskLibConnectParams {
  char *vmxSpec;
  char *serverName;
  char *thumbPrint;
  long reserved1;
  enum VixDiskLibCredType credType;
  union VixDiskLibCreds creds;
  uint32_t port;
  uint32_t nfcHostPort;
  char *reserved3;
  char reserved4[8];
  void *reserved5;
  union VixDiskLibSpec spec;
  enum VixDiskLibSpecType specType;
} VixDiskLibConnectParams;

struct VixDiskLibGeometry {
  uint32_t cylinders;
  uint32_t heads;
  uint32_t sectors;
};

typedef struct VixDiskLibInfo {
  struct VixDiskLibGeometry biosGeo;
  struct VixDiskLibGeometry physGeo;
  uint64_t capacity;
  int adapterType;
  int numLinks;
  char *parentFileNameHint;
  char *uuid;
  uint32_t logicalSectorSize;
  uint32_t physicalSectorSize;
} VixDiskLibInfo;

typedef struct {
  uint64_t offset;
  uint64_t length;
} VixDiskLibBlock;

typedef struct {
  uint32_t numBlocks;
  VixDiskLibBlock blocks[1];
} VixDiskLibBlockList;

VixError VixDiskLib_InitEx(uint32_t major, uint32_t minor,
                           void *log_function, void *warn_function, void *panic_function,
                           const char *libDir, const char *configFile);
void VixDiskLib_Exit(void);
char *VixDiskLib_GetErrorText(VixError err, const char *locale);
void VixDiskLib_FreeErrorText(char *text);
VixError VixDiskLib_ConnectEx(const VixDiskLibConnectParams *params, char readOnly,
                             const char *snapshotRef, const char *transportModes,
                             VixDiskLibConnection *connection);
VixError VixDiskLib_Disconnect(VixDiskLibConnection connection);
VixError VixDiskLib_Open(const VixDiskLibConnection connection, const char *path,
                         uint32_t flags, VixDiskLibHandle *diskHandle);
VixError VixDiskLib_Close(VixDiskLibHandle diskHandle);
VixError VixDiskLib_GetInfo(VixDiskLibHandle diskHandle, VixDiskLibInfo **info);
void VixDiskLib_FreeInfo(VixDiskLibInfo *info);
VixError VixDiskLib_Read(VixDiskLibHandle diskHandle, uint64_t startSector,
                         uint64_t numSectors, unsigned char *readBuffer);
const char *VixDiskLib_GetTransportMode(VixDiskLibHandle diskHandle);
VixError VixDiskLib_QueryAllocatedBlocks(VixDiskLibHandle diskHandle,
                                         uint64_t startSector, uint64_t numSectors,
                                         uint64_t chunkSize,
                                         VixDiskLibBlockList **blockList);
VixError VixDiskLib_FreeBlockList(VixDiskLibBlockList *blockList);
"""

# libc, for a log callback that is C all the way (see the module docstring).
LIBC_CDEF = """
void vwarnx(const char *fmt, void *ap);
"""

VIX_OK = 0
VIX_E_FAIL = 1
VIX_E_NOT_SUPPORTED = 6
VIX_ERROR_CODE_MASK = 0xFFFF

VIXDISKLIB_FLAG_OPEN_READ_ONLY = 4
VIXDISKLIB_SECTOR_SIZE = 512
VIXDISKLIB_MIN_CHUNK_SIZE = 128  # sectors
VIXDISKLIB_MAX_CHUNK_NUMBER = 512 * 1024  # chunks per QueryAllocatedBlocks call
VIXDISKLIB_CRED_UID = 1
VIXDISKLIB_SPEC_VMX = 0

# The API level we ask InitEx for. 6.5 is what nbdkit asks for and every VDDK from
# 6.5 to 8.x accepts it; QueryAllocatedBlocks is found by symbol, not by this number.
VDDK_API_MAJOR = 6
VDDK_API_MINOR = 5
