"""Prompt files: which lines are items, how bad lines become failed items, whole-file errors."""

from __future__ import annotations

import json
import os

import pytest

from wan_nabla.batch.prompts import PromptFileError, read_prompt_file


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return p


def test_txt_skips_blank_and_comment_lines_and_numbers_items(tmp_path):
    """Indices count items only (seeds derive from them); lines are the file's for messages."""
    text = "# header\n\n  a red fox  \r\n   # indented comment\n\t\nsecond\u2028still second\nthird"
    p = _write(tmp_path, "p.txt", text)
    items = read_prompt_file(p)
    assert [(i.index, i.line, i.prompt, i.error) for i in items] == [
        (0, 3, "a red fox", None),
        (1, 6, "second\u2028still second", None),  # U+2028 is not a line break in the file format
        (2, 7, "third", None),
    ]


def test_txt_utf8_bom_and_invalid_utf8_line(tmp_path):
    """A BOM is not part of the first prompt; a line that is not UTF-8 is a failed item, not a crash."""
    p = _write(tmp_path, "p.txt", b"\xef\xbb\xbffirst\n\xff\xfe broken\n# caf\xe9 comment is skipped\nlast\n")
    items = read_prompt_file(p)
    assert items[0].prompt == "first"
    assert items[1].prompt is None and items[1].error == "line 2: not valid UTF-8 (byte 1)"
    assert [i.prompt for i in items] == ["first", None, "last"]


def test_jsonl_fields_and_null_means_unset(tmp_path):
    rec = {
        "prompt": "fox",
        "negative_prompt": "blur",
        "seed": 3,
        "size": [32, 16],
        "frames": 5,
        "steps": 2,
        "guidance_scale": 1.5,
        "name": "Fox 1",
    }
    p = _write(tmp_path, "p.jsonl", json.dumps(rec) + "\n" + json.dumps({"prompt": "b", "seed": None, "name": None}))
    a, b = read_prompt_file(p)
    assert (a.prompt, a.negative_prompt, a.name) == ("fox", "blur", "Fox 1")
    assert a.overrides == {"seed": 3, "size": [32, 16], "frames": 5, "steps": 2, "guidance_scale": 1.5}
    assert (b.overrides, b.name, b.error) == ({}, None, None)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"prompt": "a",', "line 1: not valid JSON"),
        ("[1, 2]", "line 1: expected a JSON object, got list"),
        ('"just a string"', "line 1: expected a JSON object, got str"),
        ('{"seed": 1}', "line 1: missing 'prompt'"),
        ('{"prompt": "   "}', "line 1: prompt: must be a non-empty string"),
        ('{"prompt": 42}', "line 1: prompt: 42 is not allowed; use a string"),
        ('{"prompt": "a", "colour": "red"}', "line 1: unknown key 'colour'; allowed keys: prompt,"),
        ('{"prompt": "a", "negative_prompt": ["x"]}', "line 1: negative_prompt: ['x'] is not allowed"),
        ('{"prompt": "a", "name": ""}', "line 1: name: must be a non-empty string"),
        ('{"prompt": "a", "seed": 1, "seed": 2}', "line 1: not valid JSON: duplicate key 'seed'"),
        ('{"prompt": "\\ud83e"}', "line 1: prompt: contains an unpaired UTF-16 surrogate"),
        ("[" * 100000 + "]" * 100000, "line 1: not valid JSON"),
    ],
)
def test_jsonl_bad_records_become_failed_items(tmp_path, line, reason):
    """Each kind of bad record has its own one-line reason; none raises."""
    (item,) = read_prompt_file(_write(tmp_path, "p.jsonl", line + "\n"))
    assert item.error is not None and item.error.startswith(reason), item.error
    assert "\n" not in item.error


def test_jsonl_keeps_going_after_bad_lines(tmp_path):
    p = _write(tmp_path, "p.jsonl", '# c\n{"prompt": "a"}\n{oops\n\n{"prompt": "b"}\n')
    assert [(i.index, i.line, i.prompt, bool(i.error)) for i in read_prompt_file(p)] == [
        (0, 2, "a", False), (1, 3, None, True), (2, 5, "b", False)]  # fmt: skip


def test_jsonl_escapes_decode_to_the_real_characters(tmp_path):
    """NUL and newline escapes are part of the prompt (the file name is made safe elsewhere)."""
    (item,) = read_prompt_file(_write(tmp_path, "p.jsonl", '{"prompt": "a\\u0000b\\nc \\ud83e\\udd8a"}\n'))
    assert item.prompt == "a\x00b\nc 🦊" and item.error is None


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, "does not exist"),
        ("p.csv", "prompt\nfox\n", "unknown extension '.csv'"),
        ("noext", "fox\n", "no extension; use .txt"),
        ("empty.txt", "# only comments\n\n", "has no prompts"),
        ("empty.jsonl", "", "has no prompts"),
    ],
)
def test_whole_file_problems_raise(tmp_path, name, content, message):
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    with pytest.raises(PromptFileError, match=message) as err:
        read_prompt_file(p)
    assert "\n" not in str(err.value)


def test_directory_is_not_a_prompt_file(tmp_path):
    d = tmp_path / "dir.txt"
    d.mkdir()
    with pytest.raises(PromptFileError, match="is a directory"):
        read_prompt_file(d)


def test_uppercase_extension_is_accepted(tmp_path):
    assert read_prompt_file(_write(tmp_path, "P.JSONL", '{"prompt": "a"}'))[0].prompt == "a"


@pytest.mark.parametrize(
    ("data", "encoding"),
    [
        ("a red fox\npaper boat\n".encode("utf-16"), "UTF-16 (little-endian) text (byte order mark)"),
        ("a red fox\n".encode("utf-16-be"), "UTF-16 or UTF-32 text"),
        ("a red fox\n".encode("utf-32"), "UTF-32 (little-endian)"),
        ("Füchse im Schnee\ncafé au lait\nplain ascii\n".encode("latin-1"), "Windows-1252 or Latin-1 (2 lines"),
    ],
)
def test_non_utf8_prompt_files_are_refused_naming_the_encoding(tmp_path, data, encoding):
    """Guards: a UTF-16 file (Windows Notepad, PowerShell redirection) or a Latin-1 export gave
    one "not valid UTF-8" failed item per line, or for UTF-16 garbage prompts with NUL bytes; now
    the whole file is refused up front with the encoding named."""
    with pytest.raises(PromptFileError) as err:
        read_prompt_file(_write(tmp_path, "p.txt", data))
    assert encoding in str(err.value) and "save it as UTF-8" in str(err.value) and "\n" not in str(err.value)


def test_one_bad_line_in_a_utf8_file_stays_one_failed_item(tmp_path):
    """The encoding rule must not turn one corrupt line into a refused file when the rest of the
    file is evidently UTF-8."""
    items = read_prompt_file(_write(tmp_path, "p.txt", "Füchse\n".encode() + b"caf\xe9\ncaf\xe9 again\n"))
    assert [i.error is None for i in items] == [True, False, False]


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "too_big"])
def test_prompt_file_must_be_a_bounded_regular_file(tmp_path, monkeypatch, kind):
    """Guards: a FIFO blocked forever, /dev/zero (named p.txt by a symlink) read until memory ran
    out; now both are refused at once, and so is a file over the size bound."""
    import wan_nabla.batch.prompts as prompts

    p = tmp_path / "p.txt"
    if kind == "fifo":
        os.mkfifo(p)
        needle = "FIFO"
    elif kind == "dev_zero":
        os.symlink("/dev/zero", p)
        needle = "character device"
    else:
        monkeypatch.setattr(prompts, "PROMPT_FILE_MAX_BYTES", 1000)
        p.write_text("a fox\n" * 200)
        needle = "more than the 1000 bytes allowed"
    with pytest.raises(PromptFileError, match=needle):
        read_prompt_file(p)
