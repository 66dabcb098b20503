#!/usr/bin/env python3
"""Packs installed distributions, and the ones they require, back into wheels in DIR.

The doc tests run the documentation's `pip install -r requirements.txt` with no network:
`agentbox up` gets PIP_NO_INDEX=1 and PIP_FIND_LINKS=DIR, and pip installs these wheels.
Usage: wheelhouse.py DIR NAME...
"""
import base64
import hashlib
import importlib.metadata as md
import os
import re
import sys
import zipfile


def wheel_tag(dist):
    """The compressed tag set of the wheel the distribution was installed from."""
    tags = [line.split(":", 1)[1].strip() for line in (dist.read_text("WHEEL") or "").splitlines()
            if line.startswith("Tag:")]
    if not tags:
        return "py3-none-any"
    parts = [sorted({t.split("-")[i] for t in tags}) for i in range(3)]
    return "-".join(".".join(p) for p in parts)


def pack(dist, out):
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    path = os.path.join(out, f"{name}-{dist.version}-{wheel_tag(dist)}.whl")
    record, record_name = [], None
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for f in dist.files or []:
            s = str(f)
            if s.startswith("..") or "__pycache__" in s or s.endswith(".pyc"):
                continue
            if ".dist-info/" in s and s.rsplit("/", 1)[1] in ("RECORD", "INSTALLER", "REQUESTED",
                                                               "direct_url.json"):
                if s.endswith("/RECORD"):
                    record_name = s
                continue
            data = f.locate().read_bytes()
            z.writestr(s, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{s},sha256={digest.decode()},{len(data)}")
        record.append(f"{record_name},,")
        z.writestr(record_name, "\n".join(record) + "\n")


def main():
    out, todo, done = sys.argv[1], list(sys.argv[2:]), set()
    os.makedirs(out, exist_ok=True)
    while todo:
        name = re.split(r"[\s;<>=!~\[(]", todo.pop().strip(), maxsplit=1)[0]
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in done:
            continue
        done.add(key)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # only required under a marker that does not hold here
        todo.extend(r for r in dist.requires or [] if "extra ==" not in r)
        pack(dist, out)


main()
