"""The jobs a user runs, built on the techniques: compress (a recipe run), the one-command
workflows (train, quantize, prune, evaluate, bench), sensitivity scans and `auto` search; and
what they share: where the data comes from (`run_data`), the output folder (`run_folder`) and
the recipes the CLI writes for them (`cli_recipes`). Nothing below imports this package."""
