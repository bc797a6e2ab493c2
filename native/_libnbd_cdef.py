"""C declarations of the parts of libnbd (``libnbd.so.0``, API of 1.14) that snapferry uses.

Copied by hand from ``libnbd.h`` so that only the runtime library (Debian ``libnbd0``) is
needed: cffi ABI mode parses these lines and ``dlopen``s the shared object.
"""

from __future__ import annotations

SONAME = "libnbd.so.0"

CDEF = """
struct nbd_handle;

typedef struct {
  int (*callback) (void *user_data, int *error);
  void *user_data;
  void (*free) (void *user_data);
} nbd_completion_callback;

typedef struct {
  int (*callback) (void *user_data, const char *metacontext,
                   uint64_t offset, uint32_t *entries, size_t nr_entries,
                   int *error);
  void *user_data;
  void (*free) (void *user_data);
} nbd_extent_callback;

struct nbd_handle *nbd_create (void);
void nbd_close (struct nbd_handle *h);
const char *nbd_get_error (void);
int nbd_get_errno (void);

int nbd_set_export_name (struct nbd_handle *h, const char *export_name);
int nbd_set_request_structured_replies (struct nbd_handle *h, bool request);
int nbd_get_structured_replies_negotiated (struct nbd_handle *h);
int nbd_set_pread_initialize (struct nbd_handle *h, bool request);
int nbd_set_handle_name (struct nbd_handle *h, const char *handle_name);
int nbd_add_meta_context (struct nbd_handle *h, const char *name);
int nbd_set_uri_allow_local_file (struct nbd_handle *h, bool allow);
int nbd_connect_uri (struct nbd_handle *h, const char *uri);
int nbd_aio_connect_uri (struct nbd_handle *h, const char *uri);
int nbd_aio_is_connecting (struct nbd_handle *h);
int nbd_aio_is_ready (struct nbd_handle *h);
int nbd_connect_unix (struct nbd_handle *h, const char *unixsocket);
int nbd_shutdown (struct nbd_handle *h, uint32_t flags);

int64_t nbd_get_size (struct nbd_handle *h);
int nbd_can_multi_conn (struct nbd_handle *h);
int nbd_can_meta_context (struct nbd_handle *h, const char *metacontext);
int64_t nbd_get_block_size (struct nbd_handle *h, int size_type);
int nbd_is_read_only (struct nbd_handle *h);

int nbd_pread (struct nbd_handle *h, void *buf, size_t count,
               uint64_t offset, uint32_t flags);
int nbd_block_status (struct nbd_handle *h, uint64_t count, uint64_t offset,
                      nbd_extent_callback extent_callback, uint32_t flags);

int64_t nbd_aio_pread (struct nbd_handle *h, void *buf, size_t count,
                       uint64_t offset, nbd_completion_callback completion_callback,
                       uint32_t flags);
int nbd_poll (struct nbd_handle *h, int timeout);
int nbd_aio_command_completed (struct nbd_handle *h, uint64_t cookie);
int64_t nbd_aio_peek_command_completed (struct nbd_handle *h);
int nbd_aio_in_flight (struct nbd_handle *h);
int nbd_aio_is_dead (struct nbd_handle *h);
int nbd_aio_is_closed (struct nbd_handle *h);
"""

# Constants from libnbd.h.
SIZE_MINIMUM = 0
SIZE_PREFERRED = 1
SIZE_MAXIMUM = 2
STATE_HOLE = 1
STATE_ZERO = 2
SHUTDOWN_ABANDON_PENDING = 0x10000
CONTEXT_BASE_ALLOCATION = "base:allocation"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
