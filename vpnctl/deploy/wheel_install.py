"""Install an already-resolved set of wheels into a fresh venv, without pip (runs on the host).

Shipped inside the runtime tarball (``tools/wheel_install.py``) and run there by the new venv's
own interpreter::

    VENV/bin/python wheel_install.py VENV WHEEL...

The wheelhouse was resolved on the operator's machine (exact pins, one wheel per distribution,
built or downloaded for this host's target), so there is nothing to resolve here: each wheel is
unpacked the way the wheel spec (PEP 427/491) says, and checked as it goes:

* every member must be listed in the wheel's ``RECORD`` with a sha256 that matches its bytes
  (``RECORD`` itself and signature files excepted), and every file ``RECORD`` lists must be
  there: a damaged or tampered wheel stops the install;
* member names must be relative, without ``..``, backslashes or NUL, and no member may be a
  symlink; every destination is checked to stay inside the venv;
* ``<dist>.data/{purelib,platlib}/`` go to site-packages, ``scripts/`` to ``bin/`` (a
  ``#!python`` line becomes the venv's interpreter), ``data/`` to the venv root; ``headers/``
  and any other key are refused;
* ``console_scripts`` entry points become small launchers in ``bin/``; ``INSTALLER`` says
  ``vpnctl``.

Nothing is byte-compiled (as with ``pip install --no-compile`` before). Stdlib only, and kept to
Python 3.6 syntax: it runs on whatever python3 the host has. Exit 0 on success; on failure one
line ``wheel_install: <wheel>: <why>`` on stderr and exit 1.
"""

import base64
import configparser
import hashlib
import os
import stat
import sys
import sysconfig
import zipfile

MIN_PYTHON = (3, 9)  # deploy.runtime.MIN_PYTHON
SCRIPT_KEYS = ("scripts",)
LIB_KEYS = ("purelib", "platlib")
SIGNATURES = (".jws", ".p7s")


class WheelError(Exception):
    """A wheel that cannot be installed safely; the message says why."""


def _inside(root, rel):
    """The absolute path of `rel` below `root`; WheelError if it would leave `root`."""
    if not rel or "\\" in rel or "\0" in rel or rel.startswith("/"):
        raise WheelError(f"unsafe member name {rel!r}")
    parts = rel.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise WheelError(f"unsafe member name {rel!r}")
    path = os.path.join(root, *parts)
    real_root = os.path.realpath(root)
    parent = os.path.realpath(os.path.dirname(path))
    if os.path.commonpath([real_root, parent]) != real_root:
        raise WheelError(f"member {rel!r} would land outside {root}")
    return path


def _record(zf, dist_info):
    """RECORD as {name: (algorithm, urlsafe-b64 digest)}; names without a hash map to None."""
    try:
        text = zf.read(dist_info + "/RECORD").decode("utf-8")
    except KeyError:
        raise WheelError(f"no {dist_info}/RECORD") from None
    out = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        # path,hash,size -- a path with a comma is quoted (csv); none of ours are, refuse them
        fields = line.rsplit(",", 2)
        if len(fields) != 3 or fields[0].startswith('"'):
            raise WheelError(f"unreadable RECORD line {line!r}")
        name, digest = fields[0], fields[1]
        if digest:
            algorithm, _, value = digest.partition("=")
            if algorithm not in ("sha256", "sha384", "sha512"):
                raise WheelError(f"RECORD uses {algorithm!r} for {name} (sha256+ required)")
            out[name] = (algorithm, value)
        else:
            out[name] = None
    return out


def _dist_info(zf, wheel):
    """The one ``*.dist-info`` directory at the top of the wheel."""
    tops = {name.split("/", 1)[0] for name in zf.namelist()}
    found = sorted(top for top in tops if top.endswith(".dist-info"))
    if len(found) != 1:
        raise WheelError(f"expected one .dist-info directory, found {len(found)}")
    return found[0]


def _launcher(python, module, attr):
    """A console_scripts launcher: `python` runs ``module:attr`` (attr may be dotted)."""
    return (
        f"#!{python}\n# installed by vpnctl (console_scripts entry point)\nimport sys\n"
        "import importlib\n"
        f"_entry = importlib.import_module({module!r})\n"
        f"for _name in {attr!r}.split('.'):\n    _entry = getattr(_entry, _name)\n"
        "if __name__ == '__main__':\n    sys.exit(_entry())\n"
    )


def install_wheel(wheel, paths, python):
    """Unpack one wheel into `paths` (sysconfig names: purelib, platlib, scripts, data)."""
    with zipfile.ZipFile(wheel) as zf:
        dist_info = _dist_info(zf, wheel)
        meta = zf.read(dist_info + "/WHEEL").decode("utf-8")
        fields = dict(line.split(":", 1) for line in meta.splitlines() if ":" in line)
        version = fields.get("Wheel-Version", "").strip()
        if not version.startswith("1."):
            raise WheelError(f"Wheel-Version {version!r} is not 1.x")
        purelib = fields.get("Root-Is-Purelib", "true").strip().lower() == "true"
        root = paths["purelib"] if purelib else paths["platlib"]
        record = _record(zf, dist_info)
        data_dir = dist_info[: -len(".dist-info")] + ".data"
        seen = set()
        for info in zf.infolist():
            name = info.filename
            if name.endswith("/"):
                continue  # a directory entry
            if stat.S_ISLNK(info.external_attr >> 16):
                raise WheelError(f"member {name!r} is a symlink")
            seen.add(name)
            data = zf.read(info)
            expected = record.get(name)
            if name != dist_info + "/RECORD" and not name.endswith(SIGNATURES):
                if expected is None:
                    raise WheelError(f"member {name!r} is not in RECORD with a hash")
                algorithm, value = expected
                digest = base64.urlsafe_b64encode(hashlib.new(algorithm, data).digest())
                if digest.rstrip(b"=").decode() != value.rstrip("="):
                    raise WheelError(f"member {name!r} does not match its RECORD hash")
            if name.startswith(data_dir + "/"):
                key, _, rel = name[len(data_dir) + 1 :].partition("/")
                if key in LIB_KEYS:
                    dest = _inside(paths[key], rel)
                elif key in SCRIPT_KEYS:
                    dest = _inside(paths["scripts"], rel)
                    if data.startswith(b"#!python"):
                        data = b"#!" + python.encode() + data[len(b"#!python") :]
                    info.external_attr |= 0o755 << 16
                elif key == "data":
                    dest = _inside(paths["data"], rel)
                else:
                    raise WheelError(f"cannot install {name!r} ({key} files are not supported)")
            else:
                dest = _inside(root, name)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            mode = 0o755 if (info.external_attr >> 16) & 0o111 else 0o644
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.chmod(dest, mode)  # the umask may have cut it
        missing = sorted(name for name in record if name not in seen)
        if missing:
            raise WheelError(f"RECORD lists files the wheel lacks: {', '.join(missing[:3])}")
        with open(os.path.join(root, dist_info, "INSTALLER"), "w") as out:
            out.write("vpnctl\n")
        if dist_info + "/entry_points.txt" in seen:
            parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
            parser.optionxform = str  # type: ignore[assignment,method-assign]
            parser.read_string(zf.read(dist_info + "/entry_points.txt").decode("utf-8"))
            if parser.has_section("console_scripts"):
                for script, target in parser.items("console_scripts"):
                    module, _, attr = target.partition(":")
                    module, attr = module.strip(), attr.split("[")[0].strip()
                    if not module or not attr or "/" in script:
                        raise WheelError(f"bad console_scripts entry {script!r} = {target!r}")
                    dest = _inside(paths["scripts"], script.strip())
                    with open(dest, "w") as out:
                        out.write(_launcher(python, module, attr))
                    os.chmod(dest, 0o755)  # noqa: S103 - a launcher is a program


def main(argv):
    """``wheel_install.py VENV WHEEL...``; run with VENV's own interpreter."""
    if len(argv) < 2:
        sys.stderr.write("usage: wheel_install.py VENV WHEEL...\n")
        return 2
    if sys.version_info < MIN_PYTHON:
        need = "{}.{}".format(*MIN_PYTHON)
        sys.stderr.write(f"python3 on this host is older than {need}; the runtime needs {need}+\n")
        return 4
    venv = os.path.abspath(argv[0])
    if os.path.realpath(sys.prefix) != os.path.realpath(venv):
        sys.stderr.write(f"wheel_install: run me with {venv}/bin/python\n")
        return 2
    names = sysconfig.get_path_names()
    paths = {key: sysconfig.get_path(key) for key in names}
    python = os.path.join(venv, "bin", "python")
    for wheel in argv[1:]:
        try:
            install_wheel(wheel, paths, python)
        except (WheelError, zipfile.BadZipFile, OSError, KeyError, ValueError) as exc:
            sys.stderr.write(f"wheel_install: {os.path.basename(wheel)}: {exc}\n")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
