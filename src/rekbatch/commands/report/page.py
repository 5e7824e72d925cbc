"""The report page from its model, through the Jinja2 templates in ``templates/``: the
environment escapes every value it inserts, so a key, a person's name, a label or detected
text shows as text whatever characters it holds."""

from __future__ import annotations

import base64
from datetime import datetime

import jinja2

from rekbatch import __version__
from rekbatch.commands.report.model import Answer, Thumb, Thumbs
from rekbatch.commands.report.results import Sections


def _data_uri(thumb: Thumb) -> str:
    assert thumb.jpeg is not None
    return "data:image/jpeg;base64," + base64.b64encode(thumb.jpeg).decode("ascii")


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("rekbatch.commands.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    environment.filters["data_uri"] = _data_uri
    return environment


_ENVIRONMENT = _environment()


def render_page(
    job: str,
    answers: list[Answer],
    thumbs: Thumbs,
    generated: datetime,
    max_per_person: int | None,
    sections: Sections | None = None,
) -> str:
    return _ENVIRONMENT.get_template("page.html").render(
        job=job,
        kind="rekbatch face report" if sections is None else "rekbatch report",
        answers=answers,
        thumbs=thumbs,
        stamp=generated.strftime("%Y-%m-%d %H:%M:%S UTC"),
        max_per_person=max_per_person,
        sections=sections,
        version=__version__,
    )
