"""GPU images that must carry TE / SGLang: SPIN_REQUIRE_TE=1 / SPIN_REQUIRE_SGLANG=1 turn a skip into a failure."""

import pytest

from tests.helpers import missing


def test_a_missing_component_skips_unless_required(monkeypatch):
    monkeypatch.delenv("SPIN_REQUIRE_TE", raising=False)
    with pytest.raises(pytest.skip.Exception, match="TE is absent"):
        missing("te", "TE is absent")
    monkeypatch.setenv("SPIN_REQUIRE_TE", "1")
    with pytest.raises(pytest.fail.Exception, match=r"TE is absent \(and SPIN_REQUIRE_TE=1 requires it\)"):
        missing("te", "TE is absent")
