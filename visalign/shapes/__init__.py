"""visalign.shapes"""
