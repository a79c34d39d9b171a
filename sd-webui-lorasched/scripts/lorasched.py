"""The WebUI Script of sd-webui-lorasched: an accordion in txt2img and img2img, and the hooks that replay the
schedule of every lorasched file the prompt names as `<lora:NAME:STRENGTH>` (lorasched_webui/__init__.py)."""

from __future__ import annotations

from lorasched_webui import host, library
from modules import script_callbacks, scripts, shared

HOST = host()
HOST.setup()
script_callbacks.on_script_unloaded(HOST.unload)


class Script(scripts.Script):
    def title(self) -> str:
        return "lorasched"

    def show(self, is_img2img: bool):
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool):
        import gradio as gr
        from modules.ui_components import InputAccordion

        with InputAccordion(True, label="lorasched: replay scheduled LoRAs",
                            elem_id=f"lorasched_{'img2img' if is_img2img else 'txt2img'}") as enabled:
            gr.Markdown("Files written by `lorasched merge` replay their schedule per layer and per step when the "
                        "prompt names them as `<lora:NAME:STRENGTH>`. Off: each acts as a plain LoRA (its static "
                        "mix). Text-encoder parts are static either way.")
            listing = gr.Markdown(self.listing())
            refresh = gr.Button("Refresh list", size="sm")
            refresh.click(fn=self.listing, outputs=listing)
        enabled.do_not_save_to_config = True
        return [enabled]

    @staticmethod
    def listing() -> str:
        return library.folder_listing(getattr(shared.cmd_opts, "lora_dir", None))

    def process_batch(self, p, enabled: bool = True, *args, **kwargs) -> None:
        if enabled:
            HOST.process_batch(p)

    def process_before_every_sampling(self, p, enabled: bool = True, *args, **kwargs) -> None:
        if not enabled:
            return
        replayed = HOST.process_before_every_sampling(p)
        if replayed:
            p.extra_generation_params["lorasched"] = library.infotext(replayed)
