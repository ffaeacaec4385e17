"""mixreorg.nn"""
