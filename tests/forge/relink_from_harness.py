"""relink_from_harness.py SRC_VENV DST_VENV PKG...

Puts the exact files of PKG (as installed in SRC_VENV, per its dist-info RECORD) into DST_VENV as hard
links, after `pip uninstall`-ing whatever version DST_VENV has. Used when a host's pins make pip move
torch off the version the harness tested (reForge's setuptools==69.5.1 pin makes pip pick torch 2.12.1,
since torch 2.14.1 declares setuptools>=77.0.3) -- without downloading ~3 GB of CUDA wheels again.
"""

import csv
import glob
import importlib.metadata as md
import os
import subprocess
import sys

src, dst, pkgs = sys.argv[1], sys.argv[2], sys.argv[3:]


def sp(v):
    return glob.glob(os.path.join(v, "lib", "python3*", "site-packages"))[0]


ssp, dsp = sp(src), sp(dst)
subprocess.run([os.path.join(dst, "bin", "python"), "-m", "pip", "uninstall", "-y", "-q", *pkgs], check=False)
for name in pkgs:
    dist = next(
        d
        for d in md.distributions(path=[ssp])
        if d.metadata["Name"].lower().replace("_", "-") == name.lower().replace("_", "-")
    )
    n = 0
    for row in csv.reader(dist.read_text("RECORD").splitlines()):
        rel = row[0]
        s = os.path.normpath(os.path.join(ssp, rel))
        d = os.path.normpath(os.path.join(dsp, rel))
        if not os.path.isfile(s) or "__pycache__" in rel:
            continue
        os.makedirs(os.path.dirname(d), exist_ok=True)
        if os.path.lexists(d):
            os.remove(d)
        if rel.startswith("../../../bin/"):  # console scripts carry the venv path in their shebang
            with open(s, "rb") as f:
                data = f.read().replace(src.encode(), dst.encode())
            with open(d, "wb") as f:
                f.write(data)
            os.chmod(d, 0o755)
        else:
            os.link(s, d)
        n += 1
    print(f"relinked {name} {dist.version}: {n} files")
