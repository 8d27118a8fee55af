"""Edit models: per-pair instructions, the edit methods' losses on numbers, control images through the families."""

from __future__ import annotations

import pytest

from difflora.data.instructions import instruction_path, read_instruction, write_instruction
from difflora.errors import UserError


def test_instruction_file_next_to_the_before_image(tmp_path):
    before = tmp_path / "cat.png"
    assert instruction_path(before) == tmp_path / "cat.instruction.txt"
    assert read_instruction(before) is None
    write_instruction(before, "  make the fur orange \n")
    assert (tmp_path / "cat.instruction.txt").read_text(encoding="utf-8") == "make the fur orange\n"
    assert read_instruction(before) == "make the fur orange"
    with pytest.raises(UserError, match="one line"):
        write_instruction(before, "two\nlines")
    assert read_instruction(before) == "make the fur orange"  # a refused write leaves the file as it was
    write_instruction(before, "   ")
    assert not instruction_path(before).exists() and read_instruction(before) is None
