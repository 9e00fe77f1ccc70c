"""visalign.generators"""
