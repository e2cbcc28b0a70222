# Full fine-tuning: every backbone tensor trains (peft=None).
_base_ = ['./vmamba_s.py']
