# Full fine-tuning: every backbone tensor trains (peft=None).
_base_ = ['./vim_s.py']
