"""Reusable recipe fragments, picked by group in a recipe's ``defaults`` or on the command line.

``trainer/`` holds Trainer presets (``cpu``, ``ddp-cpu-2``), ``callbacks/`` callback stacks
(``stats``, ``none``): ``statplug fit tabular trainer=ddp-cpu-2``. The folder is installed as
``statplug.configs``; this file makes it a regular package, so it is found without guessing
whether it came from a wheel or a source checkout.
"""
