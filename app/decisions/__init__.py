"""Decisions (OpenAI's `/v1/decisions`) for any causal LM: question parsing, the prompt format and
the option-scoring maths. No HTTP here: the server (app/api/openai/decisions.py) and the fine-tune
loop (app/finetune/decisions.py) both build on these modules, so a classifier is trained on exactly
the prompts it is later asked."""
