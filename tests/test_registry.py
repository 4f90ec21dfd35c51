"""The registry of tables and figures against the report's captions: one caption per name, none left over,
and each optional result's caption names the setting that makes it."""

from conftest import ROOT

from vitplasticity import registry

RULES = ROOT / "workflow" / "rules"
NAMED = [("table", name) for name in (*registry.TABLES, registry.PAPER_COMPARISON)] + [
    ("figure", name) for name in (*registry.FIGURES, registry.PAPER_COMPARISON)]


def test_every_table_and_figure_has_its_caption_and_no_caption_is_left_over():
    captions = {(RULES / registry.caption(kind, name)).resolve() for kind, name in NAMED}
    assert [path for path in captions if not path.is_file()] == []
    on_disk = {path.resolve() for pattern in ("table_*.rst", "figure_*.rst")
               for path in (ROOT / "workflow" / "report").glob(pattern)}
    assert on_disk == captions


def test_the_caption_of_an_optional_result_names_the_setting_that_makes_it():
    names = {name for _, name in NAMED}
    assert set(registry.ENABLED_BY) <= names
    for kind, name in NAMED:
        if name in registry.ENABLED_BY:
            text = (RULES / registry.caption(kind, name)).read_text()
            assert f"``{registry.ENABLED_BY[name]}``" in text, (kind, name)


def test_table_and_figure_names_are_unique_within_their_kind():
    assert len(set(registry.TABLES)) == len(registry.TABLES)
    assert len(set(registry.FIGURES)) == len(registry.FIGURES)
    assert registry.PAPER_COMPARISON not in (*registry.TABLES, *registry.FIGURES)
