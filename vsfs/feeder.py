"""An XML document written in pieces: when the bytes so far form one whole document.

A write to an ``xml`` or ``define`` file (or a ``<source>`` to ``sources/TYPE``) may
come in any number of pieces (``dd bs=1``, a shell's ``printf`` per line). The adapter
(fuse_ops) feeds each piece here and acts on the document as soon as it is whole, so
that the writer learns the outcome from ``write()`` and not only from ``close()``
(STYLE.md: "Report errors from write()"). Parsing itself is xmlio's hardened parser.
"""

from __future__ import annotations

import re

from lxml import etree

from .errors import Invalid
from .xmlio import LXML_INPUT_ERRORS, MAX_XML_BYTES, libxml2_says, malformed, safe_parser

# libxml2's error codes (xmlParserErrors in include/libxml/xmlerror.h; lxml has them as
# etree.ErrorTypes, which lxml-stubs lack) for "the document is not finished yet": no
# root element yet, an element, comment, processing instruction or CDATA section still
# open (the bytes so far end with a ">" inside one). Any other error is a real syntax
# error.
XML_ERR_DOCUMENT_EMPTY = 4
XML_ERR_COMMENT_NOT_FINISHED = 45
XML_ERR_PI_NOT_FINISHED = 47
XML_ERR_CDATA_NOT_FINISHED = 63
XML_ERR_TAG_NOT_FINISHED = 77
_INCOMPLETE_CODES = frozenset({XML_ERR_DOCUMENT_EMPTY, XML_ERR_TAG_NOT_FINISHED,
                               XML_ERR_COMMENT_NOT_FINISHED, XML_ERR_PI_NOT_FINISHED,
                               XML_ERR_CDATA_NOT_FINISHED})


# What may follow the root element (XML's Misc*): white space, comments, processing
# instructions.
_MISC = re.compile(rb"\A(?:\s|<!--.*?-->|<\?.*?\?>)*", re.DOTALL)


def _misc_prefix(rest: bytes) -> bool:
    """Whether what is left after whole Misc items can still become one."""
    return (not rest or b"<!--".startswith(rest) or b"<?".startswith(rest)
            or (rest.startswith(b"<!--") and b"-->" not in rest)
            or (rest.startswith(b"<?") and b"?>" not in rest))


def _local_name(el: etree._Element) -> str:
    # Not etree.QName(el): an undeclared prefix leaves "p:pool" as the tag, which QName
    # refuses with a ValueError; the whole parse then says what is wrong with it.
    tag = el.tag
    return tag.rpartition("}")[2] if isinstance(tag, str) else ""


class DocumentFeeder:
    """Collects written chunks and says when they form one complete document.

    Syntax errors are reported as soon as the bytes show them; a document
    whose root element has closed is complete (trailing white space allowed).
    Whoever acts on the document sets ``acted``, so that a refusal of what follows
    says whether the document was done already.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self._parser = etree.XMLPullParser(
            events=("start", "end"),
            resolve_entities=False,
            no_network=True,
            load_dtd=False,
        )
        self._depth = 0
        self.complete = False
        self._trailer = bytearray()
        self._root = ""  # the root element's name, once complete
        self.acted = False

    def settled(self) -> bool:
        """Complete, and what followed it so far is whole Misc items (white space, closed
        comments and processing instructions): nothing written so far can still turn out
        invalid, so the document may be acted on. A trailer still open ("<", "<!-- x")
        is only known good or bad at close (finish())."""
        return self.complete and not _MISC.sub(b"", bytes(self._trailer), count=1)

    def _outcome(self) -> str:
        return ("the document itself was acted on already" if self.acted
                else "nothing was done")

    def _after_the_end(self) -> Invalid:
        return Invalid(f"data after the end of the XML document ({self._outcome()})")

    def feed(self, chunk: bytes) -> bool:
        if self.complete:
            # After the root element only white space, comments and processing
            # instructions may follow (XML's Misc); the parser says whether they do.
            # Checked as text, not by the parser: libxml2's push parser trips over a
            # comment cut between two writes there.
            self._trailer += chunk
            if len(self._trailer) > MAX_XML_BYTES:
                raise Invalid(f"more than {MAX_XML_BYTES} bytes after the XML document")
            if not _misc_prefix(_MISC.sub(b"", bytes(self._trailer), count=1)):
                raise self._after_the_end()
            self._check_misc()
            return True
        self.data += chunk
        if len(self.data) > MAX_XML_BYTES:
            raise Invalid(f"XML document larger than {MAX_XML_BYTES} bytes")
        try:
            self._parser.feed(chunk)
            for event, el in self._parser.read_events():
                if event == "start":
                    self._depth += 1
                else:
                    self._depth -= 1
                    if self._depth == 0 and isinstance(el, etree._Element):
                        self.complete = True
                        self._root = _local_name(el)
        except LXML_INPUT_ERRORS as e:
            raise malformed(e) from None
        if not self.complete and self.data.rstrip().endswith(b">"):
            # libxml2's push parser goes silent on some errors (a bare '&') and
            # only says so at the end; a whole parse tells which it is.
            self.complete = self._whole_document_parses()
        if self.complete:
            # What this write had after the root element starts the trailer; the
            # document acted on is what comes before.
            self._trailer = bytearray(self._after_root())
            del self.data[len(self.data) - len(self._trailer):]
        return self.complete

    def _check_misc(self) -> None:
        """The trailer's whole comments and processing instructions as XML has them (no
        "--" in a comment, a PI with a target that is not "xml"): the pattern above only
        finds where they end."""
        whole = _MISC.match(bytes(self._trailer))
        if whole is None or not whole.group(0).strip():
            return
        try:
            etree.fromstring(b"<x/>" + whole.group(0), safe_parser())
        except LXML_INPUT_ERRORS as e:
            raise Invalid(f"malformed XML after the document: {libxml2_says(e)} "
                          f"({self._outcome()})") from None

    def _after_root(self) -> bytes:
        """The bytes after the root element's end, which must be (the start of) Misc."""
        data = bytes(self.data)
        ends = list(re.finditer(
            rb"</(?:[\w.-]+:)?" + re.escape(self._root.encode()) + rb"\s*>", data))
        # The first end tag with only Misc after it: after one written inside a comment
        # in the document, the real end tag follows, which is not Misc. A root without
        # content ends with "/>".
        for m in ends or list(re.finditer(rb"/>", data)):
            rest = data[m.end():]
            if _misc_prefix(_MISC.sub(b"", rest, count=1)):
                return rest
        raise self._after_the_end()

    def _whole_document_parses(self) -> bool:
        try:
            root = etree.fromstring(bytes(self.data), safe_parser())
        except etree.XMLSyntaxError as e:
            if getattr(e, "code", None) in _INCOMPLETE_CODES:  # lxml-stubs lack .code
                return False
            raise malformed(e) from None
        except LXML_INPUT_ERRORS as e:
            raise malformed(e) from None
        self._root = _local_name(root)
        return True

    def finish(self) -> None:
        """At close: refuse a document that never completed, or one whose trailer is
        not closed, saying why and whether the document was acted on."""
        if self.complete:
            if not self.settled():
                raise Invalid("a comment or processing instruction after the XML document "
                              f"is not closed ({self._outcome()})")
            return
        if not self.data:
            return
        try:
            etree.fromstring(bytes(self.data), safe_parser())
        except LXML_INPUT_ERRORS as e:
            # At the end of the input libxml2 cannot tell a cut-off document from
            # a broken one; say both, with its own words.
            raise Invalid(f"malformed or incomplete XML document ({libxml2_says(e)}): nothing was "
                          "done") from None
        self.complete = True
