"""TensorBoard copy of the run log (`train.tensorboard`, both trainers): rank 0 writes every number of every
log.jsonl record as a scalar at the record's step into `out_dir/tensorboard/`, one event per record, flushed to disk
at once.
The writer is tensorboardX's (the `tensorboard` extra), imported only when the switch is on.

Resume: a run killed after its last checkpoint (step S) wrote steps the resumed run writes again. As `truncate_log`
cuts log.jsonl, `cut_events` first drops every event after S from the folder's event files, so the files hold each
step once for any reader; the new event file then opens with a restart marker (SessionLog START at S + 1, what
SummaryWriter's purge_step writes), so that a TensorBoard already showing the killed run's later steps drops them.
"""

from __future__ import annotations

import numbers
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from semhitok.runtime.configio import ConfigError

TENSORBOARD_DIR = "tensorboard"
EVENTS_PREFIX = "events.out.tfevents."  # the name TensorBoard looks for
_HEADER = 12  # a TFRecord: u64 length, u32 masked crc of it, data, u32 masked crc of the data


def tensorboardx() -> Any:
    """The tensorboardX module; ConfigError naming the fix when it is not installed."""
    try:
        import tensorboardX
        from tensorboardX.proto import event_pb2, summary_pb2  # noqa: F401 (loads the protobuf classes)
    except ImportError:
        raise ConfigError("train.tensorboard needs the tensorboardX package: `pip install tensorboardX` (the "
                          "`tensorboard` extra; `make install` installs the lock, which holds it)") from None
    return tensorboardX


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a log record but its step (text and booleans are not scalars)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)}  # fmt: skip


def event_records(data: bytes) -> Iterator[bytes]:
    """The whole TFRecords of an event file's bytes, in order; stops at a record a kill cut short."""
    at = 0
    while at + _HEADER <= len(data):
        end = at + _HEADER + struct.unpack_from("<Q", data, at)[0] + 4
        if end > len(data):
            return
        yield data[at:end]
        at = end


def cut_events(folder: Path, step: int) -> None:
    """Drop the events after `step` (and a record cut by a kill) from every event file in `folder`."""
    event = tensorboardx().proto.event_pb2.Event
    for path in sorted(folder.glob(EVENTS_PREFIX + "*")):
        data = path.read_bytes()
        kept = b"".join(r for r in event_records(data) if event.FromString(r[_HEADER:-4]).step <= step)
        if len(kept) != len(data):
            path.write_bytes(kept)


class TensorBoardLog:
    """Log records -> one TensorBoard event each (their numbers as scalars at their step), in a new event file of
    `folder` for a run that starts (or resumes) at step `start`."""

    def __init__(self, folder: Path, start: int):
        tbx = tensorboardx()
        self.event, self.summary = tbx.proto.event_pb2, tbx.proto.summary_pb2
        folder.mkdir(parents=True, exist_ok=True)
        cut_events(folder, start)
        n = len(list(folder.glob(EVENTS_PREFIX + "*")))  # a resume in the same second gets its own file
        name = f"{EVENTS_PREFIX}{int(time.time()):010d}.{socket.gethostname()}.{n:04d}"
        self.file = tbx.RecordWriter(str(folder / name))
        restart = self.event.SessionLog(status=self.event.SessionLog.START)  # TensorBoard's purge_step
        self._write(self.event.Event(file_version="brain.Event:2"))
        self._write(self.event.Event(step=start + 1, session_log=restart))

    def write(self, record: dict[str, Any]) -> None:
        values = [self.summary.Summary.Value(tag=k, simple_value=v) for k, v in scalars(record).items()]
        if values:
            self._write(self.event.Event(step=record["step"], summary=self.summary.Summary(value=values)))

    def _write(self, event: Any) -> None:
        event.wall_time = time.time()
        self.file.write(event.SerializeToString())
        self.file.flush()

    def close(self) -> None:
        self.file.close()
