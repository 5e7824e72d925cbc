"""Write-ahead notes of the images being indexed: how a resume finds faces that no row names.

IndexFaces puts an image's faces into a collection before its answer is back. A process
killed in between (or an answer lost on the wire, then retried) leaves faces that no row
names, and the image is indexed again. So before each IndexFaces call its (collection,
ExternalImageId) is appended to the notes file, one ``write()``: it is on disk as far as a
process kill goes before the request leaves. Once the answer is back in one piece the note
is no longer needed (the row is written before anything else can run, and a kill after that
loses nothing); a call whose attempts may have been carried out without an answer keeps its
note. Every ``COMPACT_LINES`` notes the file is rewritten with only the notes still needed,
so it stays small however long the run.

Notes found when a job opens, and those kept by the run, name the images whose faces the
operation compares with the rows (``operations/index_upkeep.py``); then they are dropped.
A clean run drops nothing it needs and asks the service nothing more.

Not synced on each note: after the loss of the machine itself, the notes of the last moments
may be gone with the rows of those moments (which the next run does again).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

COMPACT_LINES = 4096

Note = tuple[str, str]  # (collection, ExternalImageId)


class IndexNotes:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._loaded = False
        self._open: Counter[Note] = Counter()
        self._written = 0  # lines appended since the file was last rewritten

    def _load(self) -> None:
        """Notes left by earlier runs stay needed until ``settled``."""
        if not self._loaded:
            self._loaded = True
            for note in read_notes(self.path):
                self._open[note] += 1
            self._rewrite()

    def left(self) -> set[Note]:
        """The notes that are still needed: left by earlier runs, or kept by this one."""
        self._load()
        return set(self._open)

    def add(self, note: Note) -> None:
        """Before the call that indexes ``note``'s image."""
        self._load()
        # Opened for each note: one more syscall pair beside a network call, and no
        # descriptor outlives a run that ends without its operations finishing.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{note[0]}\t{note[1]}\n".encode())
        finally:
            os.close(fd)
        self._open[note] += 1
        self._written += 1
        if self._written >= COMPACT_LINES:
            self._rewrite()

    def answered(self, note: Note) -> None:
        """The call's answer came in one piece: its faces are the row's."""
        count = self._open[note] - 1
        if count > 0:
            self._open[note] = count
        else:
            del self._open[note]

    def settled(self, notes: Iterable[Note]) -> None:
        """``notes``' images were compared with the rows and their stray faces deleted."""
        self._load()
        dropped = [note for note in notes if self._open.pop(note, None) is not None]
        if dropped or self._written:  # the file holds notes no longer needed
            self._rewrite()

    def _rewrite(self) -> None:
        """The file with only the notes still needed: written beside, synced, renamed over."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        text = "".join(f"{c}\t{x}\n" for c, x in sorted(self._open))
        with tmp.open("wb") as fh:
            fh.write(text.encode())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self._written = 0


def read_notes(path: Path) -> set[Note]:
    """The notes in ``path`` (none when it does not exist); a torn last line is left out."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return set()
    notes: set[Note] = set()
    for line in data.split(b"\n")[:-1]:
        collection, tab, external = line.decode("utf-8", "replace").partition("\t")
        if tab and collection and external:
            notes.add((collection, external))
    return notes


__all__ = ["COMPACT_LINES", "IndexNotes", "Note", "read_notes"]
