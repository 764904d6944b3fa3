"""The pieces of bench/generate.py (the generation benchmark), one job per module:

    plan.py           full / --quick plans and the goals
    workload.py       the requests: tasks of zipf popularity, Poisson arrivals, prompt and output
                      lengths (fixed seed; end-of-sequence ignored so lengths are as drawn)
    records.py        one record per request (send, first token, end, tokens) and their statistics
    fmplex_gen.py     fmplex: a real fmplexd and task processes, driven by AsyncClient streams
    hf_static.py      transformers + PEFT static padded batches with adapter_names (a subprocess)
    colocated.py      one transformers process per task (its LoRA merged), each serving in turn
    llamacpp.py       llama.cpp through node-llama-cpp on the base GGUF (a reference point)
    micro.py          LoRA overhead of the decoder forward at a 32-row decode batch
    fairness.py       served tokens of tasks weighted 1:2:4 under saturation

bench/generate.py is the entry point (arguments, the order of the phases, the tables).
"""
