"""rlkd: offline knowledge distillation of LLMs.

The teacher runs once (`rlkd cache`) and its top-k next-token log-probabilities are stored in
a verified, content-addressed cache; students train from that cache without the teacher.
"""

__version__ = "0.1.0"
