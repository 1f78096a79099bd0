"""Errors: every kernel errno surfaces as an OSError carrying that errno.

Messages name the address range and the reason, the way a kernel developer
would want to read them in a failing test.
"""
import errno as _errno
import os


def fmt_range(start, end=None):
    if end is None:
        return f"0x{start:x}"
    return f"[0x{start:x}, 0x{end:x})"


def oserror(err, message, start=None, end=None):
    """Build OSError(err) whose text names the range and the reason."""
    where = "" if start is None else f" at {fmt_range(start, end)}"
    return OSError(err, f"{os.strerror(err)}{where}: {message}")


class SegmentationFault(OSError):
    """A CPU access that Linux answers with SIGSEGV (errno EFAULT)."""

    def __init__(self, address, message, access="read"):
        super().__init__(_errno.EFAULT, f"SIGSEGV on {access} at 0x{address:x}: {message}")
        self.address = address
        self.access = access


class BusError(OSError):
    """A CPU access that Linux answers with SIGBUS (beyond end of file; errno EFAULT)."""

    def __init__(self, address, message, access="read"):
        super().__init__(_errno.EFAULT, f"SIGBUS on {access} at 0x{address:x}: {message}")
        self.address = address
        self.access = access


class ProcessKilled(OSError):
    """The process is gone (exited, or killed by the OOM killer); errno ESRCH."""

    def __init__(self, pid, reason):
        super().__init__(_errno.ESRCH, f"process {pid} is gone: {reason}")
        self.pid = pid
        self.reason = reason


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


class DriverBug(AssertionError):
    """A device driver broke a rule of the kernel API (what VM_BUG_ON would catch under
    CONFIG_DEBUG_VM): the message says which rule, where, and what the driver should do."""
