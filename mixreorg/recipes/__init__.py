"""mixreorg.recipes"""
