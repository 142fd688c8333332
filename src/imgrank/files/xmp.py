"""Editing XMP packets: set a few simple properties, keep everything else.

Why lxml (see docs/xmp.md for the full argument): a sidecar is someone's edit
history (darktable's ``darktable:history``, Lightroom's ``crs:`` develop
settings, digiKam's tags, keywords in any namespace), so a rating must be
changed without disturbing the rest. lxml keeps the tree exactly as written
(element order, namespace prefixes, comments, processing instructions,
whitespace); only the root element is re-serialised and the bytes before and
after it (the XML declaration, ``<?xpacket?>`` wrappers and their padding)
are kept verbatim. The parser is locked down: no DTD, no entity expansion, no
network, and a packet that declares a DOCTYPE is refused, since XMP never needs
one and that is how XML bombs work.

All functions here are pure (bytes in, bytes out); files are handled by
:mod:`imgrank.files.sidecars`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lxml import etree

RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
X_NS = "adobe:ns:meta/"

#: The namespaces imgrank writes, by the prefix used in field names (``xmp:Rating``).
NAMESPACES = {
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "digiKam": "http://www.digikam.org/ns/1.0/",
    # imgrank's own marks: what it wrote, so a later `imgrank train` can tell its own
    # guesses from a person's ratings.
    "imgrank": "urn:imgrank:xmp:1.0/",
}

#: A sidecar larger than this is not an XMP sidecar (they are a few kB).
MAX_PACKET_BYTES = 4 * 1024 * 1024

_NEW_PACKET = (
    '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
    '<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="imgrank">\n'
    ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
    " </rdf:RDF>\n"
    "</x:xmpmeta>\n"
    '<?xpacket end="w"?>\n'
)

_DOCTYPE = re.compile(rb"<!(DOCTYPE|ENTITY)", re.IGNORECASE)
# What may precede the root element: whitespace, a BOM, PIs (<?xml?>, <?xpacket?>), comments.
_PROLOG_ITEM = re.compile(rb"\s+|\xef\xbb\xbf|<\?.*?\?>|<!--.*?-->", re.DOTALL)


class XmpError(ValueError):
    """A packet that cannot be edited safely (not XMP, not well-formed, declares a DTD)."""


@dataclass(frozen=True)
class Field:
    """One simple XMP property, e.g. ``Field("xmp", "Rating")``."""

    prefix: str
    name: str

    @classmethod
    def parse(cls, text: str) -> Field:
        prefix, _, name = text.partition(":")
        if prefix not in NAMESPACES or not name:
            known = ", ".join(f"{p}:..." for p in NAMESPACES)
            raise XmpError(f"unknown XMP field {text!r} (imgrank writes {known})")
        return cls(prefix, name)

    @property
    def namespace(self) -> str:
        return NAMESPACES[self.prefix]

    @property
    def clark(self) -> str:
        """``{namespace}Name``, lxml's spelling."""
        return f"{{{self.namespace}}}{self.name}"

    def __str__(self) -> str:
        return f"{self.prefix}:{self.name}"


def _parser() -> etree.XMLParser:
    from lxml import etree

    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_blank_text=False,
        remove_comments=False,
        remove_pis=False,
        strip_cdata=False,
    )


def _parse(data: bytes) -> etree._Element:
    from lxml import etree

    if len(data) > MAX_PACKET_BYTES:
        raise XmpError(f"{len(data):,} bytes is too large for an XMP sidecar")
    if _DOCTYPE.search(data):
        raise XmpError("it declares a DOCTYPE or entities, which XMP never needs")
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as exc:
        raise XmpError(f"not well-formed XML ({exc})") from None
    if root.tag not in (f"{{{X_NS}}}xmpmeta", f"{{{RDF_NS}}}RDF"):
        raise XmpError(f"its root element is {root.tag}, not x:xmpmeta or rdf:RDF")
    if _rdf(root) is None:
        raise XmpError("it has no rdf:RDF element")
    return root


def _rdf(root: etree._Element) -> etree._Element | None:
    if root.tag == f"{{{RDF_NS}}}RDF":
        return root
    return root.find(f"{{{RDF_NS}}}RDF")


def _descriptions(root: etree._Element) -> list[etree._Element]:
    rdf = _rdf(root)
    return [] if rdf is None else list(rdf.iterchildren(f"{{{RDF_NS}}}Description"))


def read_fields(data: bytes | None, fields: list[Field]) -> dict[Field, str | None]:
    """The current value of each field (None when absent) in a packet (None: no packet).

    Raises:
        XmpError: the packet cannot be parsed safely.
    """
    values: dict[Field, str | None] = {f: None for f in fields}
    if not data:
        return values
    root = _parse(data)
    for description in _descriptions(root):
        for f in fields:
            if values[f] is not None:
                continue
            if f.clark in description.attrib:
                values[f] = description.attrib[f.clark]
            else:
                child = description.find(f.clark)
                if child is not None and len(child) == 0:
                    values[f] = (child.text or "").strip()
    return values


def _split(data: bytes) -> tuple[bytes, bytes, bytes]:
    """``(prolog, root element, epilog)`` of a document, by byte position."""
    position = 0
    while True:
        match = _PROLOG_ITEM.match(data, position)
        if match is None or match.end() == position:
            break
        position = match.end()
    start = position
    if not data.startswith(b"<", start):
        raise XmpError("unexpected content before the root element")
    # The root's own tag name as written, e.g. b"x:xmpmeta".
    name = re.match(rb"<([^\s/>]+)", data[start:])
    if name is None:
        raise XmpError("no root element")
    closing = b"</" + name.group(1)
    end_tag = data.rfind(closing)
    if end_tag < start:
        raise XmpError("the root element is empty or not closed")
    end = data.index(b">", end_tag) + 1
    return data[:start], data[start:end], data[end:]


def set_fields(data: bytes | None, values: dict[Field, str]) -> bytes:
    """A packet with each field set to its value, everything else kept.

    A field already present is changed where it is (as an attribute or as an
    element, whichever the packet uses); a new field goes into a new
    ``rdf:Description rdf:about=""`` that declares its namespace (XMP allows
    several), added at the end of ``rdf:RDF``.

    The edit is first made on the bytes, so that everything else stays byte for
    byte as it was; that result is accepted only if it parses to the same tree
    as the same edit made through lxml. Where it does not (an unusual layout),
    the lxml tree is written instead, which keeps every element, attribute and
    namespace but may change quoting and the line breaks inside tags.

    Args:
        data: The current packet, or None to start a new one.
        values: Field -> new value (text).

    Raises:
        XmpError: the packet cannot be parsed safely.
    """
    source = data if data else _NEW_PACKET.encode("utf-8")
    root = _parse(source)
    expected = _edit_tree(root, values)
    spliced = _splice(source, root, values)
    if spliced is not None and _same_tree(_parse(spliced), expected):
        return spliced
    return _serialize(source, expected)


def _edit_tree(root: etree._Element, values: dict[Field, str]) -> etree._Element:
    """A copy of ``root`` with the fields set (the reference for :func:`_splice`)."""
    import copy

    from lxml import etree

    root = copy.deepcopy(root)
    descriptions = _descriptions(root)
    about = descriptions[0].get(f"{{{RDF_NS}}}about", "") if descriptions else ""
    for f, value in values.items():
        for description in descriptions:
            if f.clark in description.attrib:
                description.set(f.clark, value)
                break
            child = description.find(f.clark)
            if child is not None and len(child) == 0:
                child.text = value
                break
        else:
            rdf = _rdf(root)
            assert rdf is not None  # _parse checked it
            home = etree.SubElement(
                rdf,
                f"{{{RDF_NS}}}Description",
                {f"{{{RDF_NS}}}about": about},
                nsmap={f.prefix: f.namespace},
            )
            home.set(f.clark, value)
            descriptions.append(home)
    return root


def _escape(value: str) -> bytes:
    from xml.sax.saxutils import quoteattr

    return quoteattr(value, {"\n": "&#10;", "\r": "&#13;", "\t": "&#9;"}).encode("utf-8")


def _splice(data: bytes, root: etree._Element, values: dict[Field, str]) -> bytes | None:
    """The edit made on the bytes; None when a field's spot cannot be found exactly once."""
    rdf = _rdf(root)
    assert rdf is not None
    rdf_prefix = (rdf.prefix + ":").encode() if rdf.prefix else b""
    additions = []
    for f, value in values.items():
        located = None
        for description in _descriptions(root):
            if f.clark in description.attrib:
                located = ("attribute", description)
                break
            child = description.find(f.clark)
            if child is not None and len(child) == 0:
                located = ("element", child)
                break
        if located is None:
            about = (
                _descriptions(root)[0].get(f"{{{RDF_NS}}}about", "") if _descriptions(root) else ""
            )
            additions.append(
                b"<"
                + rdf_prefix
                + b"Description "
                + rdf_prefix
                + b"about="
                + _escape(about)
                + b" xmlns:"
                + f.prefix.encode()
                + b"="
                + _escape(f.namespace)
                + b" "
                + f.prefix.encode()
                + b":"
                + f.name.encode()
                + b"="
                + _escape(value)
                + b"/>"
            )
            continue
        kind, element = located
        prefix = next((p for p, ns in element.nsmap.items() if ns == f.namespace and p), None)
        if prefix is None:
            return None
        qname = re.escape(f"{prefix}:{f.name}".encode())
        if kind == "attribute":
            pattern = re.compile(rb"(\s" + qname + rb"\s*=\s*)(\"[^\"]*\"|'[^']*')")
            replacement = _escape(value)
        else:
            pattern = re.compile(
                rb"(<" + qname + rb"(?:\s[^>]*)?>)([^<]*)(?=</" + qname + rb"\s*>)"
            )
            replacement = _escape(value)[1:-1]
        matches = list(pattern.finditer(data))
        if len(matches) != 1:
            return None
        match = matches[0]
        data = data[: match.start(2)] + replacement + data[match.end(2) :]
    if additions:
        closing = b"</" + rdf_prefix + b"RDF>"
        end = data.rfind(closing)
        if end < 0:
            return None
        # New lines go just before the closing tag's line, indented one step deeper.
        line_start = data.rfind(b"\n", 0, end) + 1
        indent = data[line_start:end]
        if indent.strip():  # the closing tag shares its line with something else
            line_start, indent = end, b""
        data = (
            data[:line_start]
            + b"".join(indent + b" " + a + b"\n" for a in additions)
            + data[line_start:]
        )
    return data


def _same_tree(a: etree._Element, b: etree._Element) -> bool:
    """Equal as XML, ignoring whitespace between elements and namespace declaration spots."""
    from lxml import etree

    def normal(element: etree._Element) -> bytes:
        element = etree.fromstring(etree.tostring(element), _parser())
        for node in element.iter():
            if node.text is not None and not node.text.strip():
                node.text = None
            if node.tail is not None and not node.tail.strip():
                node.tail = None
        return etree.tostring(element, method="c14n", exclusive=True)

    return normal(a) == normal(b)


def _serialize(source: bytes, root: etree._Element) -> bytes:
    """``root`` written by lxml between the original bytes before and after the root element."""
    from lxml import etree

    body = etree.tostring(root, encoding="UTF-8", xml_declaration=False, with_tail=False)
    try:
        prolog, _, epilog = _split(source)
    except (XmpError, ValueError):
        return etree.tostring(root.getroottree(), encoding="UTF-8", xml_declaration=True)
    return prolog + body + epilog
