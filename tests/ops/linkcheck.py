"""Checks the internal links of a built mdBook: every link to a page of the book must
reach a file that exists, and every #anchor an id in that page. External links
(http:, https:, mailto:) are not followed: CI reaches no web site.

    python3 tests/ops/linkcheck.py BOOK_DIR

Prints one line per dead link and exits 1 if there was any."""

import html.parser
import os
import sys
import urllib.parse


class Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids = set()
        self.links = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("id", "name") if tag == "a" else ("id",):
            if attrs.get(key):
                self.ids.add(attrs[key])
        for key in ("href", "src"):
            if tag in ("a", "link", "img", "script") and attrs.get(key):
                self.links.append((tag, attrs[key]))


def main(root):
    pages = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".html"):
                path = os.path.join(dirpath, f)
                page = Page()
                with open(path, encoding="utf-8") as fh:
                    page.feed(fh.read())
                pages[os.path.normpath(path)] = page
    dead = []
    checked = 0
    for path, page in sorted(pages.items()):
        for tag, link in page.links:
            url = urllib.parse.urlsplit(link)
            if url.scheme or url.netloc:
                continue
            target = path
            if url.path:
                target = os.path.normpath(os.path.join(os.path.dirname(path), urllib.parse.unquote(url.path)))
                if os.path.isdir(target):
                    target = os.path.join(target, "index.html")
            checked += 1
            rel = os.path.relpath(path, root)
            if not os.path.exists(target):
                dead.append(f"{rel}: {link}: no such file")
                continue
            if url.fragment and tag == "a":
                anchors = pages.get(target)
                if anchors is not None and urllib.parse.unquote(url.fragment) not in anchors.ids:
                    dead.append(f"{rel}: {link}: no such anchor")
    for d in dead:
        print(d)
    print(f"{len(pages)} pages, {checked} internal links, {len(dead)} dead")
    return 1 if dead or not pages else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
