"""The file log (the default backend): segment files and snapshots in a local directory.

- ``file``: ``FileLog`` and ``open_file_log``, the ``EventLog`` itself;
- ``writer``: the thread that writes, fsyncs and rotates the segments;
- ``segments``: the on-disk format of records (checksummed, hash-chained frames);
- ``reader``: a cursor that reads complete records as they appear;
- ``window``: the records this process appended lately, served to followers from memory;
- ``places``: where the log knows records are, without reading;
- ``integrity``: the check on every open, and the deep ``verify_log``;
- ``anchors`` and ``snapshots``: snapshot files, and what each says about the history;
- ``repair``: moves the damaged part of a log aside, and records that it did.

The runtime never imports this package: it knows the log through ``EventLog`` only, and
``open_log`` opens this one. The command line uses ``verify_log`` and ``repair_log`` (``replay
--verify``, ``repair``), which work on a log directory as such.
"""

from __future__ import annotations

from xml_pipeline.log.file.file import FSYNC_POLICIES, FileLog, open_file_log
from xml_pipeline.log.file.integrity import VerifyResult, verify_log
from xml_pipeline.log.file.repair import Repair, repair_log

__all__ = ["FSYNC_POLICIES", "FileLog", "Repair", "VerifyResult", "open_file_log",
           "repair_log", "verify_log"]
