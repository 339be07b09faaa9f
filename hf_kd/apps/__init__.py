"""Applications on top of the hf_kd library: the `hf-kd` commands' work.

The library core (trainer, config, losses, tasks, teachers, student, teacher cache format, card) imports
nothing from here. Each module is one application or one of its steps:

- `distill`: the one `hf-kd distill` path for every task: (fine-tune the teacher), make the student, distil,
  (baseline), evaluate, report, save;
- `data`: splits from a Hub id or a local csv/json/jsonl/parquet file, labels, tokenisation per task;
- `teacher`: the teacher fine-tune, cached by its settings;
- `tokenizers`: the run's tokenizers, one for both models or, with teacher_tokenizer, one each;
- `evaluation`: the held-out metric of each task;
- `report`: report.md + report.png;
- `cache_teacher`: the `hf-kd cache-teacher` command;
- `validate`: one check of a run before anything happens, every problem in one message;
- `recipes` and `arguments`: recipe YAML -> dataclasses, packaged recipes found by name;
- `offline`: offline stand-ins for Hub ids (demo weights and data), resolved here, never in the core;
- `metrics`: `evaluate` metrics that load offline.
"""
