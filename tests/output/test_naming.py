"""Output names from prompts: no traversal, no control characters, bounded length, unique."""

from __future__ import annotations

import os

import pytest

from wan_nabla.output.naming import safe_slug, unique_path

NAME_LIMIT_BYTES = 255  # ext4, xfs, btrfs, apfs, ntfs (in UTF-16 units, which is never more)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A red fox, running!", "a-red-fox-running"),
        ("../../etc/passwd", "etc-passwd"),
        ("a/b\\c", "a-b-c"),
        ("nul\x00byte\nnew\rline\ttab", "nul-byte-new-line-tab"),
        ("\u202eevil\u200b.mp4", "evil-mp4"),  # bidi override and zero-width space removed
        ("🦊🎬 fox", "fox"),
        ("ｆｏｘ　ＦＯＸ", "fox-fox"),  # NFKC: full-width letters and ideographic space
        ("Füchse im Schnee", "füchse-im-schnee"),
        ("狐狸在雪地里", "狐狸在雪地里"),
        ("snake_case__name", "snake-case-name"),
    ],
)
def test_safe_slug_examples(text, expected):
    """Guards the character policy: letters/digits kept, everything else one '-'."""
    assert safe_slug(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "...", "../..", "🦊🎬", "\x00\n", "/"])
def test_safe_slug_never_empty_or_dot_name(text):
    """An empty slug would make '.mp4' (a hidden file) or '' (the directory itself)."""
    assert safe_slug(text) == "video"


@pytest.mark.parametrize("name", ["CON", "nul", "Aux", "com1", "LPT9", "com¹"])
def test_safe_slug_avoids_windows_reserved_names(name):
    """'con.mp4' cannot be created on Windows, whatever the extension."""
    slug = safe_slug(name)
    assert slug not in {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
    assert slug.endswith("-video")


def test_safe_slug_length_limits_in_characters_and_bytes():
    """500 ASCII characters stop at 60; 4-byte characters stop at 120 bytes, so slug + '-NNNN.mp4'
    + the '.<name>.<random>.tmp.mp4' temp wrapping stays below 255 bytes."""
    assert len(safe_slug("x" * 500)) == 60
    wide = safe_slug("𠀀" * 200)  # CJK extension B: a letter, 4 bytes in UTF-8
    assert len(wide.encode()) <= 120 and set(wide) == {"𠀀"}
    temp_name = f".{wide}-9999.mp4.abcdefgh.tmp.mp4"
    assert len(temp_name.encode()) < NAME_LIMIT_BYTES
    assert not safe_slug("ab-" * 100).endswith("-")


def test_unique_path_suffixes_past_existing_and_taken(tmp_path):
    """Never an existing file, never a name already given out in this run."""
    assert unique_path(tmp_path, "a fox") == tmp_path / "a-fox.mp4"
    (tmp_path / "a-fox.mp4").write_bytes(b"x")
    assert unique_path(tmp_path, "a fox") == tmp_path / "a-fox-2.mp4"
    assert unique_path(tmp_path, "a fox", taken={"a-fox-2.mp4"}) == tmp_path / "a-fox-3.mp4"
    assert unique_path(tmp_path, "a fox", suffix=".json") == tmp_path / "a-fox.json"


def test_unique_path_treats_dangling_symlink_as_taken(tmp_path):
    """Path.exists() is False for a dangling link; writing through it would create its target."""
    os.symlink(tmp_path / "elsewhere" / "target.mp4", tmp_path / "a-fox.mp4")
    assert unique_path(tmp_path, "a fox") == tmp_path / "a-fox-2.mp4"


def test_unique_path_available_callback_overrides_existence(tmp_path):
    """The batch lets an item reuse its own leftover file: `available` decides, not existence."""
    (tmp_path / "a-fox.mp4").write_bytes(b"x")
    assert unique_path(tmp_path, "a fox", available=lambda p: True) == tmp_path / "a-fox.mp4"
    assert unique_path(tmp_path, "a fox", available=lambda p: p.name != "a-fox.mp4") == tmp_path / "a-fox-2.mp4"


@pytest.mark.parametrize("text", ["../../etc/passwd", "/abs/path", "..", "a/../../b", "~/x", "C:\\Windows\\x"])
def test_unique_path_stays_inside_directory(tmp_path, text):
    out = unique_path(tmp_path, text)
    assert out.resolve().parent == tmp_path.resolve()


def test_repeated_slugs_cost_linear_probes_and_same_names(tmp_path):
    """Guards batch planning against quadratic naming (10,000 equal prompts took minutes): with
    a run's `counters`, n requests for one slug probe O(n) names in all, and the names are exactly
    those of the plain linear probe, including an item that may reuse its own leftover file."""
    n = 3000
    probes = 0

    class CountingSet(set):
        """Counts membership tests: the skip loop over taken names is where the quadratic cost was."""

        lookups = 0

        def __contains__(self, item):
            CountingSet.lookups += 1
            return super().__contains__(item)

    def available(p):
        nonlocal probes
        probes += 1
        return p.name != "a-fox-5.mp4" or own  # -5 exists and belongs to one item only

    taken = CountingSet()
    counters: dict[str, int] = {}
    names = []
    for i in range(n):
        own = i == 10
        names.append(unique_path(tmp_path, "a fox", taken=taken, available=available, counters=counters).name)
        taken.add(names[-1])
    assert probes < 2 * n and CountingSet.lookups < 4 * n, (probes, CountingSet.lookups)
    expected = ["a-fox.mp4", *(f"a-fox-{k}.mp4" for k in (2, 3, 4, 6, 7, 8, 9, 10, 11, 5, 12, 13))]
    assert names[:13] == expected and len(set(names)) == n
    plain: set[str] = set()
    for i in range(40):  # no counters: the same answers
        own = i == 10
        name = unique_path(tmp_path, "a fox", taken=plain, available=available).name
        assert name == names[i]
        plain.add(name)
