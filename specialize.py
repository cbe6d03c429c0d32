"""Domain specialisation: `python specialize.py --mode prompt|finetune|compare|all [--checkpoint DIR] ...`.

prompt: optimise prompts, weights untouched; finetune: LoRA or full fine-tune; compare: base vs tuned; all: the
three in turn. `python specialize.py --help` lists every mode's flags; the code is in specialize/launcher.py.
"""
import sys

from specialize.launcher import main

if __name__ == "__main__":
    sys.exit(main())
