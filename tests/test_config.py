"""The config loader: YAML + dotted overrides onto typed dataclasses, with errors that name the key."""

from dataclasses import dataclass, field

import pytest

from config import ConfigError, load_config, save_config


@dataclass
class Inner:
    depth: int = 2
    """Number of layers."""
    patch: tuple[int, int, int] = (1, 2, 2)
    """Patch size (t, h, w)."""
    kind: str = "flow"
    """'flow' or 'ddpm'."""

    def __post_init__(self):
        if self.depth < 1:
            raise ValueError(f"depth={self.depth}: must be >= 1")
        if self.kind not in ("flow", "ddpm"):
            raise ValueError(f"kind={self.kind!r}: must be one of 'flow', 'ddpm'")


@dataclass
class Outer:
    name: str = "run"
    """Run name."""
    lr: float = 1e-4
    """Learning rate."""
    inner: Inner = field(default_factory=Inner)
    """The nested section."""


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = write(tmp_path, "lr: 0.5\ninner:\n  depth: 3\n  patch: [1, 4, 4]\n")
    cfg = load_config(Outer, path, ["inner.depth=7"])
    assert cfg.lr == 0.5 and cfg.inner.depth == 7 and cfg.inner.patch == (1, 4, 4)
    assert isinstance(cfg.inner, Inner) and cfg.name == "run"


def test_config_files_layer_in_order_and_overrides_still_win(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("name: base\nlr: 0.5\ninner:\n  depth: 3\n  kind: ddpm\n")
    stage = tmp_path / "stage.yaml"
    stage.write_text("lr: 0.25\ninner:\n  depth: 5\n")
    cfg = load_config(Outer, [base, stage], ["inner.depth=7"])
    # the later file replaces only the keys it names, nested ones included; the override wins over both
    assert (cfg.name, cfg.lr, cfg.inner.depth, cfg.inner.kind) == ("base", 0.25, 7, "ddpm")
    assert load_config(Outer, [stage, base]).lr == 0.5
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(Outer, [base, tmp_path / "nope.yaml"])


@pytest.mark.parametrize(
    "text, overrides, must_mention",
    [
        ("inner:\n  dept: 3\n", [], ["inner.dept", "depth"]),  # typo'd key lists valid ones
        ("", ["inner.depth=three"], ["inner.depth", "three"]),  # wrong type
        ("", ["inner.depth=0"], ["inner", "depth=0", ">= 1"]),  # invalid value from __post_init__
        ("", ["inner.kind=diffusion"], ["inner", "'diffusion'", "flow"]),
        ("", ["lr"], ["lr", "key=value"]),  # malformed override
    ],
)
def test_bad_config_names_key_value_and_allowed(tmp_path, text, overrides, must_mention):
    with pytest.raises(ConfigError) as err:
        load_config(Outer, write(tmp_path, text), overrides)
    for fragment in must_mention:
        assert fragment in str(err.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_saved_config_loads_back_identical(tmp_path):
    cfg = load_config(Outer, None, ["name=x", "inner.patch=[2,2,2]", "inner.kind=ddpm"])
    path = save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert load_config(Outer, path) == cfg
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
