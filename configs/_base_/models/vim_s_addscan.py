# Additional-scan: 6 extra SSM states per direction (A_log copied from column 0, a new
# d_inner -> 12 projection for their B and C).
_base_ = ['./vim_s.py']
model = dict(backbone=dict(peft=dict(additional_scan=dict(states=6))))
