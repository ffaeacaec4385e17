"""mixreorg.data"""
