"""Domain specialisation: `python specialize.py --mode prompt|finetune|compare|all [--checkpoint DIR] ...`.

prompt: optimise prompts, weights untouched; finetune: the trainer's fine-tuning preset (full or LoRA); compare: base
vs tuned; all: the three in turn. `python specialize.py --help` lists every mode's flags; the code is specialize/cli.py.
"""
import sys

from specialize.cli import main

if __name__ == "__main__":
    sys.exit(main())
