"""Publishing a converted folder: the conversion record convert leaves in OUT, the model card,
the fixture measurement, and the upload to the Hub."""
