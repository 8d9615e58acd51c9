"""The README's commands: CI runs its test command, and every published command line parses."""
import importlib
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()


def shell_blocks(text):
    """Yield the commands of every ```bash block, with backslash continuations joined."""
    for block in re.findall(r'```bash\n(.*?)```', text, flags=re.S):
        for command in block.replace('\\\n', ' ').splitlines():
            command = command.strip()
            if command and not command.startswith('#'):
                yield command


def parser_for(script):
    """Return the argparse parser of an entry script named as in the README."""
    name = Path(script).name
    if name in ('train_ffhq.py', 'train_animeface.py'):
        trainer = importlib.import_module('eigengan.trainer')
        size = 256 if name == 'train_ffhq.py' else 128
        return trainer.build_parser(name, size)
    folder = Path(script).parent.name
    module = {
        ('', 'main_cifar100.py'): 'main_cifar100',
        ('', 'gen_pairs.py'): 'gen_pairs',
        ('', 'train.py'): 'simple_gan.train',
        ('simple_gan', 'train.py'): 'simple_gan.train',
        ('simple_gan', 'visualize.py'): 'simple_gan.visualize',
        ('eigengan', 'test.py'): 'eigengan.test',
    }.get((folder, name))
    if module is None:
        return None
    return importlib.import_module(module).build_parser()


def published_commands():
    """Return (script, arguments) of every python or torchrun command line in the README."""
    found = []
    for command in shell_blocks(README):
        if '$' in command or '|' in command:
            continue
        try:
            words = shlex.split(command.split('&&')[-1])
        except ValueError:                       # a quotation that spans several lines
            continue
        while words and '=' in words[0]:
            words = words[1:]                    # environment assignments such as VAR=1
        scripts = [i for i, w in enumerate(words) if w.endswith('.py')]
        if not words or words[0] not in ('python', 'torchrun', '.venv/bin/python') or not scripts:
            continue
        found.append((words[scripts[0]], words[scripts[0] + 1:]))
    return found


def test_ci_runs_readme_test_command():
    ci = (ROOT / '.ci' / 'run').read_text()
    assert '<!-- test command -->' in ci, ".ci/run does not read the README's marker"
    extracted = subprocess.run(
        ['awk', '/<!-- test command -->/ { found = 1; next } '
         'found && /^```/ { if (inside) exit; inside = 1; next } inside { print }',
         str(ROOT / 'README.md')], capture_output=True, text=True, check=True).stdout.strip()
    assert 'pytest' in extracted, f"README test command is {extracted!r}"
    assert 'requirements.txt' in extracted, f"README test command is {extracted!r}"


def test_first_command_runs_digits_with_all_techniques():
    first = next(c for c in shell_blocks(README) if 'main_cifar100.py' in c)
    for flag in ('--dataset digits', '--norm zcanormbatch', '--nog', '--olr', '--ow'):
        assert flag in first, f"first command lacks {flag}: {first}"
    assert 'pip install -r requirements.txt' in first, first


def test_published_commands_are_in_readme():
    commands = [' '.join([s, *a]) for s, a in published_commands()]
    assert any("main_cifar100.py --norm=zcanormbatch --batch_size=128 --nog --olr --ow" in c
               for c in commands), "the published CIFAR command is missing"
    assert any('train_ffhq.py DATA_ROOT --size 256 --batch 64 --reg_type nog' in c
               for c in commands), "the published EigenGAN command is missing"
    assert any('--dataset_mode celeba --model gan128 --nz 30 --reg_type nog' in c
               for c in commands), "the published vanilla GAN command is missing"


@pytest.mark.parametrize('script, arguments', published_commands(),
                         ids=lambda value: value if isinstance(value, str) else None)
def test_readme_command_parses(script, arguments):
    parser = parser_for(script)
    if parser is None:
        pytest.skip(f"{script} has no importable parser")
    try:
        parser.parse_args(arguments)
    except SystemExit as error:
        pytest.fail(f"README command rejected: {script} {' '.join(arguments)} (exit {error})")


def test_readme_links_exist():
    for target in re.findall(r'\]\(((?!https?:|#)[^)]+)\)', README):
        assert (ROOT / target).exists(), f"README links to missing {target}"
