"""mixreorg.losses"""
