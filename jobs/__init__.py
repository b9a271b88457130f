"""The shipped jobs, installed as the package `swav_jobs`: `swav jobs` lists them and `swav pretrain NAME`
runs one by name, so a non-editable install needs no checkout. (Data files only; nothing to import.)"""
