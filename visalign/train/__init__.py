"""visalign.train"""
