"""Student data: datasets, transforms, collation and the synthetic HOI world.

The class names, the annotation reader and ``DatasetError`` live in ``teacher_server.hoi``, the
vocabulary the teacher and the student share. Import the parts from their modules:
``student.data.hoi_dataset``, ``student.data.transforms``, ``student.data.synthetic``, ...
"""
