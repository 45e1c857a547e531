"""tgo's errors, one hierarchy: every error tgo raises for bad input or an unusable service is a
`TgoError` carrying the exit status the command line gives it (`tgo.cli.main` turns it into one
message line and that status, in one place). Each message names the problem and what to do.

    TgoError                       exit 2 unless said otherwise
    +-- ConfigError (ValueError)   a setting or parameter is invalid
    +-- DataError (ValueError)     the dataset cannot be used as configured
    +-- StorageError (ValueError)  the Optuna storage cannot be used
    +-- TrackingError (RuntimeError)   the MLflow tracking store cannot be used
    |   +-- StoreWriteError            recording into it (or its artifact store) failed mid-run (tgo.train turns it into a TrainingError)
    +-- ArtifactError (ValueError) a run's artifact is damaged or not tgo's (a checkpoint tgo will not unpickle)
    +-- AnalysisError (ValueError) a run cannot be analysed as asked
    +-- CompareError (ValueError)  runs cannot be compared as asked
    +-- TrainingError (RuntimeError)   training cannot go on; exit 1 (the run exists and says why)
    +-- DiskFullError (RuntimeError)   a folder or store tgo writes to is full; exit 1

Each also derives from the builtin error a caller would expect (ValueError for bad input,
RuntimeError for a failing service), so `except ValueError` keeps working.

Messages never show a password: `mask_url` hides the one in a URL, and `short_error` gives any
error as one line with its URLs masked.
"""

from __future__ import annotations

import errno
import os
import re


class TgoError(Exception):
    """The base of tgo's errors; `exit_code` is the command line's exit status for it."""

    exit_code: int = 2

    def __init__(self, message: str = "") -> None:
        # An error raised in a DataLoader worker reaches the main process re-raised as the same class
        # with the message "Caught DataError in DataLoader worker process 0.\nOriginal Traceback
        # ...\ntgo.errors.DataError: <message>" (torch's ExceptionWrapper): keep only the message
        # the worker raised.
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class ConfigError(TgoError, ValueError):
    """A setting is invalid; the message names it and its accepted values."""


class DataError(TgoError, ValueError):
    """The dataset cannot be used as configured; the message says why and what to do."""


class StorageError(TgoError, ValueError):
    """The storage URL cannot be used; the message says why and what to do."""


class TrackingError(TgoError, RuntimeError):
    """The tracking store cannot be used; the message says which and what to do."""


class StoreWriteError(TrackingError):
    """Recording into the tracking store failed mid-run (a store turned read-only, a server down past
    MLflow's retries, a full disk under the artifact store); tgo.train turns it into one TrainingError
    that says how to continue. `store` names the store that failed where it is not the tracking store
    itself (the run's artifact folder, the scratch folder), `full` says it ran out of space."""

    def __init__(self, message: str = "", store: str = "", full: bool = False) -> None:
        super().__init__(message)
        self.store, self.full = store, full


class ArtifactError(TgoError, ValueError):
    """A run's artifact cannot be used: damaged (truncated), or not what tgo wrote (a checkpoint
    holding pickled objects, which tgo never unpickles). The message names the artifact."""


class AnalysisError(TgoError, ValueError):
    """The run cannot be analysed as asked; the message says why and what to do."""


class CompareError(TgoError, ValueError):
    """The runs cannot be compared as asked; the message says why and what to do."""


class TrainingError(TgoError, RuntimeError):
    """Training cannot go on (for example a non-finite loss); the last good checkpoint is kept."""

    exit_code = 1


class DiskFullError(TgoError, RuntimeError):
    """A folder or store tgo writes to has no space left (ENOSPC, or a quota: EDQUOT). `where` names
    it (a folder, or a store's masked location); the message says what was kept and what to do.
    Exit 1: not bad input, and the command may have left a run that says why (FAILED, tgo.error)."""

    exit_code = 1

    def __init__(self, message: str = "", where: str = "", detail: str = "") -> None:
        super().__init__(message)
        self.where, self.detail = where, detail  # detail: what had no room ("for artifact ... of run ...")


_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(err: BaseException) -> bool:
    """Whether `err`, or an error it was raised from, is a full disk: an OSError with errno ENOSPC or
    EDQUOT, a DiskFullError, or an error whose message quotes one (MLflow's artifact repositories
    collect per-file failures into one MlflowException of text, shutil.copytree into a shutil.Error)."""
    texts = tuple(os.strerror(code) for code in _FULL)
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DiskFullError) or (isinstance(current, OSError) and current.errno in _FULL):
            return True
        if any(text in str(current) for text in texts):
            return True
        current = current.__cause__ or current.__context__
    return False


_PASSWORD = re.compile(r"(://[^/:@]*:)([^@/]*)@")  # scheme://user:PASSWORD@host


def mask_url(url: str) -> str:
    """The URL with its password replaced by *** (user:***@host), for every message and record:
    a storage URL may carry a password, which tgo never prints or logs. Pass passwords through the
    environment instead (PGPASSWORD, ~/.pgpass, or a PostgreSQL service file: README)."""
    return _PASSWORD.sub(r"\1***@", url)


def url_password(url: str) -> str:
    """The password in a URL ("" when it has none), to scrub from a driver's message that quotes it."""
    found = _PASSWORD.search(url)
    return found.group(2) if found else ""


def short_error(err: BaseException) -> str:
    """One line for a message: the error's type and first line, passwords masked, at most 300 chars."""
    if isinstance(err, StoreWriteError):
        return str(err)
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = mask_url(text)
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__
