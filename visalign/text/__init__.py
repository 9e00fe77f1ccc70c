"""visalign.text"""
