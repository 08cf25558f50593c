"""Write a tiny random GPT-Neo checkpoint with a tokenizer, offline: python tools/make_tiny_model.py DIR"""

import sys

from twintune.cli import main

if __name__ == "__main__":
    sys.exit(main(["make-tiny-model", *sys.argv[1:]]))
