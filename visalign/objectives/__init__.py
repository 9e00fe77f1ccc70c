"""visalign.objectives"""
