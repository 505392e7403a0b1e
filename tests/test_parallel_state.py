import pytest

from spin_megatron.errors import ConfigError
from spin_megatron.parallel.launch import spawn_local
from spin_megatron.parallel.state import validate_parallel_sizes


def test_data_parallel_size_is_what_remains():
    assert validate_parallel_sizes(8, 2, 2) == 2
    assert validate_parallel_sizes(4, 4, 1) == 1


def test_world_size_not_divisible_names_the_fix():
    with pytest.raises(
        ConfigError, match=r"world size 6 is not divisible by tp×pp = 2×2 = 4.*nproc_per_node"
    ):
        validate_parallel_sizes(6, 2, 2)


@pytest.mark.parametrize(
    "tp, pp, key", [(0, 1, "parallel.tp"), (1, -2, "parallel.pp"), (1.5, 1, "parallel.tp")]
)
def test_sizes_must_be_positive_integers(tp, pp, key):
    with pytest.raises(ConfigError, match=key):
        validate_parallel_sizes(4, tp, pp)


def test_spawn_local_gives_each_rank_the_torchrun_environment(tmp_path):
    code = (
        "import os, pathlib; e = os.environ; "
        f"pathlib.Path(r'{tmp_path}', e['RANK']).write_text(' '.join(e[k] for k in "
        "('RANK','LOCAL_RANK','WORLD_SIZE','MASTER_ADDR')))"
    )
    script = tmp_path / "probe.py"
    script.write_text(code)
    assert spawn_local(3, "probe", [], cwd=str(tmp_path)) == 0
    assert sorted(p.read_text() for p in tmp_path.iterdir() if p.name.isdigit()) == [
        f"{r} {r} 3 127.0.0.1" for r in range(3)
    ]


def test_spawn_local_stops_the_others_when_one_rank_fails(tmp_path):
    (tmp_path / "probe.py").write_text(
        "import os, sys, time\nif os.environ['RANK'] == '1': sys.exit(7)\ntime.sleep(60)\n"
    )
    assert spawn_local(2, "probe", [], cwd=str(tmp_path), timeout_s=30) == 7
