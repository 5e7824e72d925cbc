"""``rekbatch init``: a commented starter config, offline (the local face models) or AWS."""

from __future__ import annotations

import os
from pathlib import Path

from rekbatch.config.writing import toml_string

DEFAULT_PATH = Path("rekbatch.toml")
# The repository's sample photos, used when init runs in a clone of it.
SAMPLE_FOLDER = Path("samples/wheres-ric")
SAMPLE_REFERENCE = SAMPLE_FOLDER / "ric_harvey.jpeg"


def _q(value: str) -> str:
    return toml_string(value)


def _from(folder: Path, location: str) -> str:
    """A local path given from the current folder, as the config in ``folder`` reads it
    (relative paths in a config are read from its own folder)."""
    if "://" in location or location.startswith(("keys:", "inventory:")):
        return location
    path = os.path.expanduser(location)
    if os.path.isabs(path):
        return location
    return os.path.relpath(os.path.abspath(path), os.path.abspath(folder))


def starter_config(
    *,
    offline: bool,
    sources: list[str] | None = None,
    reference: str | None = None,
    folder: Path = Path("."),
) -> str:
    """The text of a starter config to be written in ``folder``. Without ``sources``: the
    sample photos when they are here (offline), a placeholder otherwise."""
    if not sources:
        if offline:
            sources = [str(SAMPLE_FOLDER) if SAMPLE_FOLDER.is_dir() else "photos"]
        else:
            sources = ["s3://my-bucket/photos/"]
    if (
        reference is None
        and offline
        and SAMPLE_REFERENCE.is_file()
        and (sources == [str(SAMPLE_FOLDER)])
    ):
        reference = str(SAMPLE_REFERENCE)
    sources = [_from(folder, source) for source in sources]
    if reference is not None:
        reference = _from(folder, reference)
    uris = ", ".join(_q(s) for s in sources)
    name = "my-offline-job" if offline else "my-job"
    parts = [
        "# A rekbatch job. Check it with `rekbatch validate THIS_FILE`, see what it would do",
        "# and cost with `rekbatch plan THIS_FILE`, then `rekbatch run THIS_FILE`.",
        "# Every key can also be set as REKBATCH_<SECTION>__<KEY> in the environment.",
        "",
        "[job]",
        f"name = {_q(name)}",
        f"output_dir = {_q('out/' + name)}         # results.jsonl, results.csv, summary.json",
        "",
        "[source]",
        f"uris = [{uris}]   # s3://bucket/prefix, local folders or single images",
        'include = ["*.jpg", "*.jpeg", "*.png"]   # globs on the key',
        "exclude = []",
        "sniff = true                             # read the first bytes: names lie",
        "",
    ]
    if offline:
        parts += [
            "[backend]",
            "kind = \"local\"     # offline face models: pip install 'rekbatch[local]'; no AWS",
            "                   # (detect_faces, compare_faces, search_faces, index_faces)",
            "",
        ]
    else:
        parts += [
            "[aws]",
            'region = "us-east-1"                     # where Rekognition is called',
            '# profile = "default"                    # else the standard credential chain',
            '# image_mode = "s3"                      # "bytes": download and send the images',
            "",
            "[backend]",
            'kind = "aws"       # "local": offline face models, no AWS account needed',
            "",
        ]
    if reference:
        parts += [
            "# How many pictures show the person in the reference image?",
            "[[operations]]",
            'type = "compare_faces"',
            f"reference = {_q(reference)}",
            "similarity_threshold = 80                # 0-100; 80 is the same-person boundary",
            "",
            "# [[operations]]",
            '# type = "detect_faces"',
        ]
    else:
        parts += [
            "[[operations]]",
            f'type = "{"detect_faces" if offline else "detect_labels"}"',
            *([] if offline else ["max_labels = 10", "min_confidence = 70"]),
            "",
            "# Find one person: uncomment and name a photo of them.",
            "# [[operations]]",
            '# type = "compare_faces"',
            '# reference = "ref.jpg"                  # or s3://bucket/key',
        ]
    parts += [
        "",
        "# Other operations: detect_faces, detect_labels, detect_text, detect_moderation_labels,",
        "# recognize_celebrities, detect_protective_equipment, search_faces (several people),",
        "# index_faces (every face, for `rekbatch find` to look anyone up later).",
        "",
        "[limits]",
        f"concurrency = {4 if offline else 32}",
        "# max_tps = 50                           # calls per second per operation",
    ]
    if offline:
        parts.append("# max_images = 1000                       # stop cleanly (resumable) here")
    else:
        parts += [
            "max_cost_usd = 10.0                      # stop cleanly (exit 4, resumable) here",
            "# max_images = 100000",
        ]
    return "\n".join(parts) + "\n"
