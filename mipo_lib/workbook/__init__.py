"""The workbook's own machinery: README rendering, publishing notebooks, exercises, environment, batch runner."""
