/*
 * vixDiskLibStub.c: a stand-in for VMware's libvixDiskLib.so, written for
 * snapferry's tests.  It exports the VixDiskLib_* symbols snapferry calls, with
 * the struct layouts of vixDiskLib.h (VDDK 7/8), and serves local files as
 * "remote" disks so the real cffi binding (native/vddk.py) can be exercised.
 *
 * Disk paths given to VixDiskLib_Open:
 *   "/abs/file"            -> that file
 *   "[ds] dir/disk.vmdk"   -> $VDDK_STUB_DISKDIR/ds/dir/disk.vmdk
 *   "rel/file"             -> $VDDK_STUB_DISKDIR/rel/file
 * Capacity is the file size in 512-byte sectors (rounded down).
 *
 * Environment knobs (read at call time):
 *   VDDK_STUB_DISKDIR       base directory for relative / datastore paths
 *   VDDK_STUB_STATS         append one line per event: "<event> <pid> [k=v ...]"
 *   VDDK_STUB_PASSWORD      if set, ConnectEx requires this password
 *   VDDK_STUB_FAIL_CONNECT  if set, ConnectEx fails (VIX_E_HOST_USER_PERMISSIONS)
 *   VDDK_STUB_FAIL_OPEN     if set, Open fails (VIX_E_FILE_NOT_FOUND)
 *   VDDK_STUB_FAIL_READ=N   the Nth Read in a process fails (VIX_E_FILE_ERROR
 *                           with high bits set, so callers must mask)
 *   VDDK_STUB_FAIL_SECTOR=S every Read covering sector S fails the same way
 *
 * Like the real library, InitEx starts a background thread and the library is
 * bound to the process that initialised it: a forked child that uses a library
 * initialised by its parent gets VIX_E_FAIL from every call (the real VDDK hangs
 * or crashes in that case), and InitEx twice in one process fails.
 *
 * Build: gcc -shared -fPIC -O2 -pthread -o libvixDiskLib.so.8 vixDiskLibStub.c
 * Define STUB_NO_QAB to leave out QueryAllocatedBlocks/FreeBlockList (VDDK < 6.7).
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

typedef uint64_t VixError;
#define VIX_OK 0
#define VIX_E_FAIL 1
#define VIX_E_OUT_OF_MEMORY 2
#define VIX_E_INVALID_ARG 3
#define VIX_E_FILE_NOT_FOUND 4
#define VIX_E_NOT_SUPPORTED 6
#define VIX_E_FILE_ERROR 7
#define VIX_E_HOST_USER_PERMISSIONS 3014

#define VIXDISKLIB_FLAG_OPEN_READ_ONLY 4
#define VIXDISKLIB_SECTOR_SIZE 512
#define VIXDISKLIB_MIN_CHUNK_SIZE 128
#define VIXDISKLIB_MAX_CHUNK_NUMBER (512 * 1024)
#define STUB_MAX_READ_SECTORS 4096 /* 2 MiB: larger requests are refused */

typedef void VixDiskLibGenericLogFunc(const char *fmt, va_list args);

enum VixDiskLibCredType {
  VIXDISKLIB_CRED_UID = 1,
  VIXDISKLIB_CRED_SESSIONID = 2,
  VIXDISKLIB_CRED_TICKETID = 3,
  VIXDISKLIB_CRED_SSPI = 4,
  VIXDISKLIB_CRED_UNKNOWN = 256
};

enum VixDiskLibSpecType {
  VIXDISKLIB_SPEC_VMX = 0,
  VIXDISKLIB_SPEC_VSTORAGE_OBJECT = 1,
  VIXDISKLIB_SPEC_UNKNOWN = 2
};

struct VixDiskLibVStorageObjectSpec {
  char *id;
  char *datastoreMoRef;
  char *ssId;
};

typedef struct VixDiskLibConnectParams {
  char *vmxSpec;
  char *serverName;
  char *thumbPrint;
  long reserved1;
  enum VixDiskLibCredType credType;
  union {
    struct {
      char *userName;
      char *password;
    } uid;
    struct {
      char *cookie;
      char *userName;
      char *key;
    } sessionId;
    void *reserved2;
  } creds;
  uint32_t port;
  uint32_t nfcHostPort;
  char *reserved3;
  char reserved4[8];
  void *reserved5;
  union {
    struct VixDiskLibVStorageObjectSpec vStorageObjSpec;
  } spec;
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

#define CONN_MAGIC 0x434f4e4eu   /* "CONN" */
#define HANDLE_MAGIC 0x48444c45u /* "HDLE" */

struct stub_conn {
  uint32_t magic;
  pid_t pid;
  char *transport;
};

struct stub_handle {
  uint32_t magic;
  pid_t pid;
  int fd;
  uint64_t capacity; /* sectors */
  struct stub_conn *conn;
};

static pid_t init_pid;
static int init_count;
static pthread_t bg_thread;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned long read_count;
static VixDiskLibGenericLogFunc *log_fn;

/* ---- helpers ----------------------------------------------------------- */

static void stat_event(const char *event, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void stat_event(const char *event, const char *fmt, ...) {
  const char *path = getenv("VDDK_STUB_STATS");
  char line[1024];
  int n;
  int fd;
  va_list ap;

  if (!path || !*path) return;
  n = snprintf(line, sizeof line, "%s %d ", event, (int)getpid());
  va_start(ap, fmt);
  n += vsnprintf(line + n, sizeof line - n - 1, fmt, ap);
  va_end(ap);
  if (n > (int)sizeof line - 2) n = (int)sizeof line - 2;
  line[n++] = '\n';
  fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return;
  /* One write() per line with O_APPEND: lines from several processes never mix. */
  if (write(fd, line, n) < 0) { /* nothing to do */ }
  close(fd);
}

static void stub_log(const char *fmt, ...) {
  va_list ap;
  if (!log_fn) return;
  va_start(ap, fmt);
  log_fn(fmt, ap);
  va_end(ap);
}

/* Error with extra bits above the low 16, as the real library returns. */
static VixError with_high_bits(VixError code) {
  return ((VixError)0x2a << 32) | ((VixError)0x5 << 16) | code;
}

/* Non-zero when this process may use the library (InitEx ran here). */
static int process_ok(void) {
  return init_count > 0 && init_pid == getpid();
}

static pthread_mutex_t bg_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t bg_cond = PTHREAD_COND_INITIALIZER;
static int bg_stop;

/* Stands in for VDDK's worker threads: logs from its own thread, then idles until
 * Exit asks it to stop (no cancellation: it may be inside the log callback). */
static void *bg_main(void *arg) {
  (void)arg;
  stub_log("vixDiskLibStub: background thread running in pid %d\n", (int)getpid());
  pthread_mutex_lock(&bg_lock);
  while (!bg_stop) pthread_cond_wait(&bg_cond, &bg_lock);
  pthread_mutex_unlock(&bg_lock);
  return NULL;
}

/* ---- init / exit ------------------------------------------------------- */

EXPORT VixError VixDiskLib_InitEx(uint32_t major, uint32_t minor,
                                  VixDiskLibGenericLogFunc *log_function,
                                  VixDiskLibGenericLogFunc *warn_function,
                                  VixDiskLibGenericLogFunc *panic_function,
                                  const char *lib_dir, const char *config_file) {
  int err;
  (void)warn_function;
  (void)panic_function;
  (void)config_file;

  if (init_count > 0) {
    stat_event("init-refused", "prior_pid=%d", (int)init_pid);
    return VIX_E_FAIL; /* twice in one process, or inherited through fork */
  }
  if (major < 6) return VIX_E_NOT_SUPPORTED;
  log_fn = log_function;
  bg_stop = 0;
  err = pthread_create(&bg_thread, NULL, bg_main, NULL);
  if (err) return VIX_E_OUT_OF_MEMORY;
  init_pid = getpid();
  init_count = 1;
  stat_event("init", "version=%u.%u libdir=%s", major, minor, lib_dir ? lib_dir : "(null)");
  stub_log("vixDiskLibStub: InitEx(%u.%u) libDir=%s\n", major, minor,
           lib_dir ? lib_dir : "(null)");
  return VIX_OK;
}

EXPORT void VixDiskLib_Exit(void) {
  if (!process_ok()) return;
  stat_event("exit", "reads=%lu", read_count);
  pthread_mutex_lock(&bg_lock);
  bg_stop = 1;
  pthread_cond_signal(&bg_cond);
  pthread_mutex_unlock(&bg_lock);
  pthread_join(bg_thread, NULL);
  init_count = 0;
  log_fn = NULL;
}

/* ---- errors ------------------------------------------------------------ */

EXPORT char *VixDiskLib_GetErrorText(VixError err, const char *locale) {
  const char *text;
  char buf[128];
  (void)locale;

  /* The real library only knows codes in the low 16 bits. */
  if (err > 0xffff) {
    snprintf(buf, sizeof buf, "Unknown error %llu", (unsigned long long)err);
    return strdup(buf);
  }
  switch (err) {
    case VIX_OK: text = "The operation was successful"; break;
    case VIX_E_FAIL: text = "Unknown error"; break;
    case VIX_E_OUT_OF_MEMORY: text = "Memory allocation failed: out of memory"; break;
    case VIX_E_INVALID_ARG: text = "One of the parameters was invalid"; break;
    case VIX_E_FILE_NOT_FOUND: text = "The file was not found"; break;
    case VIX_E_NOT_SUPPORTED: text = "The operation is not supported"; break;
    case VIX_E_FILE_ERROR: text = "A file access error occurred on the host or guest operating system"; break;
    case VIX_E_HOST_USER_PERMISSIONS: text = "Insufficient permissions in the host operating system"; break;
    default:
      snprintf(buf, sizeof buf, "Unknown error %llu", (unsigned long long)err);
      return strdup(buf);
  }
  return strdup(text);
}

EXPORT void VixDiskLib_FreeErrorText(char *text) { free(text); }

/* ---- connections ------------------------------------------------------- */

EXPORT VixError VixDiskLib_ConnectEx(const VixDiskLibConnectParams *params, char read_only,
                                     const char *snapshot_ref, const char *transport_modes,
                                     void **connection) {
  const char *want_pw = getenv("VDDK_STUB_PASSWORD");
  struct stub_conn *c;
  const char *modes;
  size_t n;

  if (!process_ok()) return VIX_E_FAIL;
  if (!params || !connection) return VIX_E_INVALID_ARG;
  if (!params->vmxSpec || strncmp(params->vmxSpec, "moref=", 6) != 0 ||
      !params->vmxSpec[6])
    return VIX_E_INVALID_ARG;
  if (!params->serverName || !*params->serverName) return VIX_E_INVALID_ARG;
  if (params->credType != VIXDISKLIB_CRED_UID || !params->creds.uid.userName ||
      !params->creds.uid.password)
    return VIX_E_INVALID_ARG;
  if (params->specType != VIXDISKLIB_SPEC_VMX || params->reserved1 != 0 ||
      params->reserved3 != NULL || params->reserved5 != NULL)
    return VIX_E_INVALID_ARG; /* a layout slip shows up as garbage here */
  if (getenv("VDDK_STUB_FAIL_CONNECT"))
    return with_high_bits(VIX_E_HOST_USER_PERMISSIONS);
  if (want_pw && strcmp(want_pw, params->creds.uid.password) != 0)
    return with_high_bits(VIX_E_HOST_USER_PERMISSIONS);

  c = calloc(1, sizeof *c);
  if (!c) return VIX_E_OUT_OF_MEMORY;
  c->magic = CONN_MAGIC;
  c->pid = getpid();
  modes = (transport_modes && *transport_modes) ? transport_modes : "nbd";
  n = strcspn(modes, ":");
  c->transport = strndup(modes, n);
  *connection = c;
  stat_event("connect",
             "vmx=%s server=%s thumbprint=%s user=%s port=%u nfc=%u snapshot=%s "
             "modes=%s ro=%d",
             params->vmxSpec, params->serverName,
             params->thumbPrint ? params->thumbPrint : "-", params->creds.uid.userName,
             params->port, params->nfcHostPort, snapshot_ref ? snapshot_ref : "-",
             transport_modes ? transport_modes : "-", (int)read_only);
  return VIX_OK;
}

EXPORT VixError VixDiskLib_Disconnect(void *connection) {
  struct stub_conn *c = connection;
  if (!process_ok()) return VIX_E_FAIL;
  if (!c || c->magic != CONN_MAGIC) return VIX_E_INVALID_ARG;
  c->magic = 0;
  free(c->transport);
  free(c);
  stat_event("disconnect", "%s", "");
  return VIX_OK;
}

/* Not used by snapferry (it fills the struct itself); exported for completeness. */
EXPORT VixDiskLibConnectParams *VixDiskLib_AllocateConnectParams(void) {
  return calloc(1, sizeof(VixDiskLibConnectParams));
}

EXPORT void VixDiskLib_FreeConnectParams(VixDiskLibConnectParams *params) { free(params); }

/* ---- disks ------------------------------------------------------------- */

static char *resolve_path(const char *path) {
  const char *base = getenv("VDDK_STUB_DISKDIR");
  char *out = NULL;
  if (path[0] == '/') return strdup(path);
  if (!base) base = ".";
  if (path[0] == '[') {
    const char *close_br = strchr(path, ']');
    const char *rest;
    if (!close_br) return NULL;
    rest = close_br + 1;
    while (*rest == ' ') rest++;
    if (asprintf(&out, "%s/%.*s/%s", base, (int)(close_br - path - 1), path + 1, rest) < 0)
      return NULL;
    return out;
  }
  if (asprintf(&out, "%s/%s", base, path) < 0) return NULL;
  return out;
}

EXPORT VixError VixDiskLib_Open(const void *connection, const char *path, uint32_t flags,
                                void **handle) {
  struct stub_conn *c = (struct stub_conn *)connection;
  struct stub_handle *h;
  struct stat st;
  char *file;
  int fd;

  if (!process_ok()) return VIX_E_FAIL;
  if (!c || c->magic != CONN_MAGIC || !path || !handle) return VIX_E_INVALID_ARG;
  if (getenv("VDDK_STUB_FAIL_OPEN")) return with_high_bits(VIX_E_FILE_NOT_FOUND);
  file = resolve_path(path);
  if (!file) return VIX_E_INVALID_ARG;
  fd = open(file, ((flags & VIXDISKLIB_FLAG_OPEN_READ_ONLY) ? O_RDONLY : O_RDWR) | O_CLOEXEC);
  free(file);
  if (fd < 0) return errno == ENOENT ? VIX_E_FILE_NOT_FOUND : VIX_E_FILE_ERROR;
  if (fstat(fd, &st) < 0) {
    close(fd);
    return VIX_E_FILE_ERROR;
  }
  h = calloc(1, sizeof *h);
  if (!h) {
    close(fd);
    return VIX_E_OUT_OF_MEMORY;
  }
  h->magic = HANDLE_MAGIC;
  h->pid = getpid();
  h->fd = fd;
  h->capacity = (uint64_t)st.st_size / VIXDISKLIB_SECTOR_SIZE;
  h->conn = c;
  *handle = h;
  stat_event("open", "path=%s flags=%u", path, flags);
  return VIX_OK;
}

static struct stub_handle *check_handle(void *handle) {
  struct stub_handle *h = handle;
  if (!h || h->magic != HANDLE_MAGIC) return NULL;
  return h;
}

EXPORT const char *VixDiskLib_GetTransportMode(void *handle) {
  struct stub_handle *h = check_handle(handle);
  return h ? h->conn->transport : "unknown";
}

EXPORT VixError VixDiskLib_Close(void *handle) {
  struct stub_handle *h = check_handle(handle);
  if (!process_ok()) return VIX_E_FAIL;
  if (!h) return VIX_E_INVALID_ARG;
  h->magic = 0;
  close(h->fd);
  free(h);
  stat_event("close", "%s", "");
  return VIX_OK;
}

EXPORT VixError VixDiskLib_GetInfo(void *handle, VixDiskLibInfo **info) {
  struct stub_handle *h = check_handle(handle);
  VixDiskLibInfo *i;
  if (!process_ok()) return VIX_E_FAIL;
  if (!h || !info) return VIX_E_INVALID_ARG;
  i = calloc(1, sizeof *i);
  if (!i) return VIX_E_OUT_OF_MEMORY;
  i->capacity = h->capacity;
  i->adapterType = 3; /* LSI Logic */
  i->numLinks = 1;
  i->biosGeo.heads = i->physGeo.heads = 255;
  i->biosGeo.sectors = i->physGeo.sectors = 63;
  i->biosGeo.cylinders = i->physGeo.cylinders = (uint32_t)(h->capacity / (255 * 63));
  i->uuid = strdup("60 00 c2 9a 6c 9e 3a 5b-1e 2f 41 0d 7a 8b 9c 0d");
  i->logicalSectorSize = 512;
  i->physicalSectorSize = 512;
  *info = i;
  return VIX_OK;
}

EXPORT void VixDiskLib_FreeInfo(VixDiskLibInfo *info) {
  if (!info) return;
  free(info->uuid);
  free(info->parentFileNameHint);
  free(info);
}

EXPORT VixError VixDiskLib_Read(void *handle, uint64_t start_sector, uint64_t nr_sectors,
                                unsigned char *buf) {
  struct stub_handle *h = check_handle(handle);
  const char *fail_nth = getenv("VDDK_STUB_FAIL_READ");
  const char *fail_sector = getenv("VDDK_STUB_FAIL_SECTOR");
  unsigned long nth;
  uint64_t off, left;

  if (!process_ok() || (h && h->pid != getpid())) return VIX_E_FAIL;
  if (!h || !buf) return VIX_E_INVALID_ARG;
  if (nr_sectors == 0 || nr_sectors > STUB_MAX_READ_SECTORS) return VIX_E_INVALID_ARG;
  if (start_sector > h->capacity || nr_sectors > h->capacity - start_sector)
    return VIX_E_INVALID_ARG;

  pthread_mutex_lock(&lock);
  nth = ++read_count;
  pthread_mutex_unlock(&lock);
  if (fail_nth && strtoul(fail_nth, NULL, 10) == nth) {
    stat_event("read-fail", "start=%llu n=%llu", (unsigned long long)start_sector,
               (unsigned long long)nr_sectors);
    return with_high_bits(VIX_E_FILE_ERROR);
  }
  if (fail_sector) {
    uint64_t s = strtoull(fail_sector, NULL, 10);
    if (s >= start_sector && s < start_sector + nr_sectors) {
      stat_event("read-fail", "start=%llu n=%llu", (unsigned long long)start_sector,
                 (unsigned long long)nr_sectors);
      return with_high_bits(VIX_E_FILE_ERROR);
    }
  }

  off = start_sector * VIXDISKLIB_SECTOR_SIZE;
  left = nr_sectors * VIXDISKLIB_SECTOR_SIZE;
  while (left > 0) {
    ssize_t r = pread(h->fd, buf, left, (off_t)off);
    if (r < 0) {
      if (errno == EINTR) continue;
      return with_high_bits(VIX_E_FILE_ERROR);
    }
    if (r == 0) { /* past EOF inside capacity cannot happen, but stay safe */
      memset(buf, 0, left);
      break;
    }
    buf += r;
    off += (uint64_t)r;
    left -= (uint64_t)r;
  }
  stat_event("read", "start=%llu n=%llu", (unsigned long long)start_sector,
             (unsigned long long)nr_sectors);
  return VIX_OK;
}

EXPORT VixError VixDiskLib_Write(void *handle, uint64_t start_sector, uint64_t nr_sectors,
                                 const unsigned char *buf) {
  (void)handle;
  (void)start_sector;
  (void)nr_sectors;
  (void)buf;
  return VIX_E_NOT_SUPPORTED; /* snapferry never writes through VDDK */
}

EXPORT VixError VixDiskLib_Flush(void *handle) {
  (void)handle;
  return VIX_OK;
}

EXPORT VixError VixDiskLib_Wait(void *handle) {
  (void)handle;
  return VIX_OK;
}

#ifndef STUB_NO_QAB

/* Allocated chunks of [start, start+nr) sectors, from SEEK_DATA/SEEK_HOLE. */
EXPORT VixError VixDiskLib_QueryAllocatedBlocks(void *handle, uint64_t start_sector,
                                                uint64_t nr_sectors, uint64_t chunk_size,
                                                VixDiskLibBlockList **block_list) {
  struct stub_handle *h = check_handle(handle);
  VixDiskLibBlockList *list;
  uint64_t chunk, nchunks, cap_blocks = 16, nblocks = 0;
  off_t chunk_bytes;

  if (!process_ok() || (h && h->pid != getpid())) return VIX_E_FAIL;
  if (!h || !block_list) return VIX_E_INVALID_ARG;
  if (chunk_size < VIXDISKLIB_MIN_CHUNK_SIZE || start_sector % chunk_size != 0 ||
      nr_sectors == 0 || nr_sectors % chunk_size != 0)
    return VIX_E_INVALID_ARG;
  nchunks = nr_sectors / chunk_size;
  if (nchunks > VIXDISKLIB_MAX_CHUNK_NUMBER) return VIX_E_INVALID_ARG;
  if (start_sector > h->capacity || nr_sectors > h->capacity - start_sector)
    return VIX_E_INVALID_ARG;

  list = malloc(offsetof(VixDiskLibBlockList, blocks) + cap_blocks * sizeof(VixDiskLibBlock));
  if (!list) return VIX_E_OUT_OF_MEMORY;
  chunk_bytes = (off_t)(chunk_size * VIXDISKLIB_SECTOR_SIZE);

  for (chunk = 0; chunk < nchunks;) {
    off_t pos = (off_t)((start_sector + chunk * chunk_size) * VIXDISKLIB_SECTOR_SIZE);
    off_t data = lseek(h->fd, pos, SEEK_DATA);
    uint64_t first, last;
    off_t hole;
    if (data < 0) break; /* ENXIO: no data from here to EOF */
    first = (uint64_t)(data / chunk_bytes) - start_sector / chunk_size;
    if (first >= nchunks) break;
    hole = lseek(h->fd, data, SEEK_HOLE);
    if (hole < 0) {
      free(list);
      return with_high_bits(VIX_E_FILE_ERROR);
    }
    last = (uint64_t)((hole + chunk_bytes - 1) / chunk_bytes) - start_sector / chunk_size;
    if (last > nchunks) last = nchunks;
    if (nblocks > 0 &&
        list->blocks[nblocks - 1].offset + list->blocks[nblocks - 1].length ==
            start_sector + first * chunk_size) {
      list->blocks[nblocks - 1].length += (last - first) * chunk_size;
    } else {
      if (nblocks == cap_blocks) {
        VixDiskLibBlockList *bigger;
        cap_blocks *= 2;
        bigger = realloc(list, offsetof(VixDiskLibBlockList, blocks) +
                                   cap_blocks * sizeof(VixDiskLibBlock));
        if (!bigger) {
          free(list);
          return VIX_E_OUT_OF_MEMORY;
        }
        list = bigger;
      }
      list->blocks[nblocks].offset = start_sector + first * chunk_size;
      list->blocks[nblocks].length = (last - first) * chunk_size;
      nblocks++;
    }
    chunk = last;
  }
  list->numBlocks = (uint32_t)nblocks;
  *block_list = list;
  stat_event("qab", "start=%llu n=%llu chunk=%llu blocks=%llu",
             (unsigned long long)start_sector, (unsigned long long)nr_sectors,
             (unsigned long long)chunk_size, (unsigned long long)nblocks);
  return VIX_OK;
}

EXPORT VixError VixDiskLib_FreeBlockList(VixDiskLibBlockList *block_list) {
  free(block_list);
  return VIX_OK;
}

#endif /* STUB_NO_QAB */

/* ---- test-only introspection (not a VDDK symbol) -------------------------
 * Sizes and offsets as gcc lays them out, so the tests can compare them with
 * the layouts cffi computes from native/vddk_cdef.py. */
EXPORT uint64_t VddkStub_Layout(int which) {
  switch (which) {
    case 0: return sizeof(VixDiskLibConnectParams);
    case 1: return offsetof(VixDiskLibConnectParams, credType);
    case 2: return offsetof(VixDiskLibConnectParams, creds);
    case 3: return offsetof(VixDiskLibConnectParams, port);
    case 4: return offsetof(VixDiskLibConnectParams, nfcHostPort);
    case 5: return offsetof(VixDiskLibConnectParams, spec);
    case 6: return offsetof(VixDiskLibConnectParams, specType);
    case 7: return sizeof(VixDiskLibInfo);
    case 8: return offsetof(VixDiskLibInfo, capacity);
    case 9: return offsetof(VixDiskLibInfo, uuid);
    case 10: return offsetof(VixDiskLibInfo, logicalSectorSize);
    case 11: return offsetof(VixDiskLibBlockList, blocks);
    case 12: return sizeof(VixDiskLibBlock);
    default: return (uint64_t)-1;
  }
}
