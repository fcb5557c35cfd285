# SPDX-License-Identifier: Apache-2.0
"""patches/series: comments and blank lines are allowed, and kept on export."""

from forklib.series import parse_series, render_series, series_changes

SERIES = """\
# Hooks, in the order upstream should review them.

0001-first.patch  # forwarded as vllm#1
0002-second.patch

# bitsandbytes leaves core last
0003-third.patch
# end
"""


def test_comments_and_blank_lines_are_not_patches():
    assert parse_series(SERIES) == [
        "0001-first.patch",
        "0002-second.patch",
        "0003-third.patch",
    ]


def test_rendering_the_same_names_reproduces_the_file():
    assert render_series(parse_series(SERIES), SERIES) == SERIES


def test_comments_follow_their_patch():
    rendered = render_series(
        ["0001-first.patch", "0003-third.patch", "0004-new.patch"], SERIES
    )
    assert rendered == (
        "# Hooks, in the order upstream should review them.\n"
        "\n"
        "0001-first.patch  # forwarded as vllm#1\n"
        "\n"
        "# bitsandbytes leaves core last\n"
        "0003-third.patch\n"
        "0004-new.patch\n"
        "# end\n"
    )


def test_a_plain_listing_without_previous_comments():
    assert render_series(["a.patch", "b.patch"]) == "a.patch\nb.patch\n"


def test_series_changes_combine_patch_by_patch(tmp_path):
    def patch(name: str, *headers: str) -> object:
        path = tmp_path / name
        path.write_text("Subject: x\n---\n" + "".join(f"{h}\n" for h in headers))
        return path

    first = patch(
        "1.patch",
        "diff --git a/vllm/a.py b/vllm/a.py",
        "diff --git a/vllm/new.py b/vllm/new.py",
        "new file mode 100644",
        "diff --git a/vllm/gone.py b/vllm/gone.py",
        "deleted file mode 100644",
        "diff --git a/vllm/temp.py b/vllm/temp.py",
        "new file mode 100644",
    )
    second = patch(
        "2.patch",
        "diff --git a/vllm/new.py b/vllm/new.py",
        "diff --git a/vllm/temp.py b/vllm/temp.py",
        "deleted file mode 100644",
        "diff --git a/vllm/old.py b/vllm/moved.py",
        "similarity index 90%",
        "rename from vllm/old.py",
        "rename to vllm/moved.py",
    )
    assert series_changes([first, second]) == {
        "vllm/a.py": "M",
        "vllm/new.py": "A",
        "vllm/gone.py": "D",
        "vllm/old.py": "D",
        "vllm/moved.py": "A",
    }
