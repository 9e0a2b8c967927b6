"""Every dit-* command that reads a checkpoint names it the same way: the first positional argument."""

import pytest

from dit_runtime.cli.eval import main as dit_eval
from dit_runtime.cli.sample import main as dit_sample
from dit_runtime.train.cli import distill_main

COMMANDS = {"dit-sample": dit_sample, "dit-eval": dit_eval, "dit-distill": distill_main}


@pytest.mark.parametrize("prog", COMMANDS)
def test_checkpoint_is_positional_and_the_flag_is_refused_with_the_form_that_works(prog, tmp_path, capsys):
    missing = str(tmp_path / "nowhere.safetensors")
    with pytest.raises(SystemExit) as e:
        COMMANDS[prog](["--checkpoint", missing])
    assert e.value.code == 2
    assert f"{prog} {missing} [options]" in capsys.readouterr().err
    # The positional form gets past argument parsing to the checkpoint itself: its error is about the missing file.
    try:
        code = COMMANDS[prog]([missing])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err + (code if isinstance(code, str) else "")
    assert code not in (0, None) and "nowhere.safetensors" in err and "not an option" not in err
